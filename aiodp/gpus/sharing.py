"""Which resources this node advertises and which device IDs each one has.

From the discovered GPUs and the config: the MIG strategy (NVIDIA's none, single, mixed,
with its names and refusals), resource-name patterns, and time-slicing or MPS replicas
(`<uuid>::<n>`), honouring `devices:` so that some GPUs are shared and others stay whole.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from aiodp.config.configfile import NamePattern, SharedResource
from aiodp.config.model import RESOURCE_GPU, Config
from aiodp.gpus.backend import DeviceInfo, MigInfo
from aiodp.gpus.devices import Device, DeviceId, Health, Kind, Resource, Uuid
from aiodp.kit.errors import ConfigError, brief

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Plan:
    resources: tuple[Resource, ...]
    """The device plugin's resources: one plugin (socket, registration) each."""
    devices: tuple[Device, ...]
    """Every device: the resources' devices, and the DRA driver's (`dra_resource`)."""

    def dra_devices(self) -> tuple[Device, ...]:
        """The GPUs and MIG devices DRA serves (never also a device plugin's)."""
        return tuple(d for d in self.devices if is_dra(d.resource))


DRA_PREFIX: Final = "dra:"


def dra_resource(driver: str) -> str:
    """The registry's name for the devices a DRA driver serves, e.g. `dra:gpu.aiodp.io`: no
    extended resource name has a colon, so no device plugin ever serves it."""
    return DRA_PREFIX + driver


def dra_device_name(dev: Device) -> str:
    """A device's name in our DRA pool, a DNS label: `gpu-3` for GPU 3, `gpu-3-mig-1` for
    its MIG device 3:1. Stable across restarts (NVIDIA's indexes), unique in the pool."""
    gpu, _, mig = dev.index.partition(":")
    return f"gpu-{gpu}-mig-{mig}" if dev.kind is Kind.MIG else f"gpu-{gpu}"


def is_dra(resource: str) -> bool:
    return resource.startswith(DRA_PREFIX)


def _dra_gpus(infos: Sequence[DeviceInfo], config: Config) -> set[str]:
    """The UUIDs of the GPUs that `dra_devices` hands to DRA (none while DRA is off)."""
    sel = config.dra_devices
    if not config.dra or sel == "none":
        return set()
    if sel == "all":
        return {g.uuid for g in infos}
    wanted = set(sel)
    missing = wanted - {str(g.index) for g in infos} - {g.uuid for g in infos}
    if missing:
        log.warning("dra.devices: GPU(s) %s are not on this node", brief(sorted(missing)))
    return {g.uuid for g in infos if str(g.index) in wanted or g.uuid in wanted}


def _named(patterns: Sequence[NamePattern], subject: str, default: str) -> str:
    for p in patterns:
        if fnmatch.fnmatchcase(subject, p.pattern):
            return p.name
    return default


def mig_resource_name(profile: str) -> str:
    """NVIDIA's name for a MIG profile: `nvidia.com/mig-1g.10gb`, `+` becomes `.`."""
    return "nvidia.com/mig-" + profile.replace("+", ".")


def _gpu_device(g: DeviceInfo, resource: str) -> Device:
    return Device(
        resource=resource,
        uuid=Uuid(g.uuid),
        gpu=Uuid(g.uuid),
        index=str(g.index),
        kind=Kind.GPU,
        paths=g.paths,
        numa_node=g.numa_node,
        health=g.health,
        reason=g.reason if g.health is Health.UNHEALTHY else "",  # shown while Unhealthy
        memory_mib=g.memory_mib,
    )


def _mig_device(g: DeviceInfo, m: MigInfo, resource: str) -> Device:
    return Device(
        resource=resource,
        uuid=Uuid(m.uuid),
        gpu=Uuid(g.uuid),
        index=f"{g.index}:{m.index}",
        kind=Kind.MIG,
        paths=(*g.paths, *m.paths),  # the parent's node and the two capability nodes
        numa_node=g.numa_node,
        health=g.health,
        reason=g.reason if g.health is Health.UNHEALTHY else "",  # shown while Unhealthy
    )


def _whole_or_mig(infos: Sequence[DeviceInfo], config: Config) -> list[Device]:
    """The devices before sharing, per MIG strategy."""

    def gpu_name(g: DeviceInfo) -> str:
        return _named(config.gpu_names, g.name, RESOURCE_GPU)

    strategy = config.mig_strategy
    mig_gpus = [g for g in infos if g.mig_enabled]
    if strategy == "none" or not mig_gpus:
        return [_gpu_device(g, gpu_name(g)) for g in infos]
    if strategy == "single":
        if len(mig_gpus) != len(infos):
            raise ConfigError(
                "migStrategy single: the node mixes MIG-enabled and non-MIG GPUs "
                f"({', '.join(str(g.index) for g in infos if not g.mig_enabled)} without MIG); "
                "use mixed"
            )
        empty = [str(g.index) for g in mig_gpus if not g.mig_devices]
        if empty:
            raise ConfigError(
                f"migStrategy single: MIG-enabled GPU(s) {', '.join(empty)} have no MIG devices"
            )
        profiles = sorted({m.profile for g in mig_gpus for m in g.mig_devices})
        if len(profiles) > 1:
            raise ConfigError(
                "migStrategy single: more than one MIG device type present "
                f"({', '.join(profiles)}); use mixed"
            )
        return [_mig_device(g, m, RESOURCE_GPU) for g in mig_gpus for m in g.mig_devices]
    devices = [_gpu_device(g, gpu_name(g)) for g in infos if not g.mig_enabled]
    for g in mig_gpus:
        if not g.mig_devices:
            log.warning("GPU %s is in MIG mode but has no MIG devices", g.index)
        for m in g.mig_devices:
            if re.match(r"^\d+c\.", m.profile):  # e.g. 1c.2g.20gb: NVIDIA skips these too
                log.warning(
                    "MIG device %s (%s) is a partial compute instance: not advertised",
                    m.uuid,
                    m.profile,
                )
                continue
            name = _named(config.mig_names, m.profile, mig_resource_name(m.profile))
            devices.append(_mig_device(g, m, name))
    return devices


def _selected(entry: SharedResource, candidates: Sequence[Device]) -> set[DeviceId]:
    """The devices of a resource that a sharing entry's `devices:` picks."""
    sel = entry.devices
    if sel == "all":
        return {d.id for d in candidates}
    if isinstance(sel, int):
        if sel > len(candidates):
            log.warning(
                "sharing %s: devices: %d, but only %d exist; sharing all of them",
                entry.name,
                sel,
                len(candidates),
            )
        return {d.id for d in candidates[:sel]}
    wanted = set(sel)
    chosen = {d.id for d in candidates if d.index in wanted or d.uuid in wanted}
    missing = wanted - {d.index for d in candidates} - {d.uuid for d in candidates}
    if missing:
        log.warning(
            "sharing %s: devices %s are not on this node", entry.name, ", ".join(sorted(missing))
        )
    return chosen


def plan(infos: Sequence[DeviceInfo], config: Config) -> Plan:
    """Resources and their devices; raises ConfigError for NVIDIA's MIG and MPS refusals."""
    dra_gpus = _dra_gpus(infos, config)
    everything = _whole_or_mig(infos, config)
    dra = [
        dataclasses.replace(d, resource=dra_resource(config.dra_driver_name))
        for d in everything
        if d.gpu in dra_gpus
    ]
    base = [d for d in everything if d.gpu not in dra_gpus]
    sharing = config.sharing
    shared: dict[DeviceId, tuple[SharedResource, str]] = {}
    if sharing is not None:
        for entry in sharing.resources:
            candidates = [d for d in base if d.resource == entry.name and d.id not in shared]
            if not candidates:
                log.warning("sharing: no %s devices on this node to share", entry.name)
                continue
            if sharing.method == "mps" and any(d.kind is Kind.MIG for d in candidates):
                raise ConfigError("sharing.mps: MIG devices cannot be shared with MPS")
            name = entry.rename or (
                f"{entry.name}.shared" if sharing.rename_by_default else entry.name
            )
            for device_id in _selected(entry, candidates):
                shared[device_id] = (entry, name)
    devices: list[Device] = []
    resources: dict[str, Resource] = {}
    for d in base:
        kind: Literal["gpu", "mig"] = "mig" if d.kind is Kind.MIG else "gpu"
        if d.id not in shared:
            devices.append(d)
            resources.setdefault(d.resource, Resource(d.resource, kind))
            continue
        entry, name = shared[d.id]
        assert sharing is not None
        devices += [d.replicated(n, name) for n in range(entry.replicas)]
        old = resources.get(name)
        resources[name] = Resource(
            name,
            kind,
            sharing.method,
            max(entry.replicas, old.replicas if old else 1),
            sharing.fail_requests_greater_than_one,
        )
    for name in resources:  # nvidia.com/gpu is checked with the flags; longer names here
        if len(str(config.socket_path(name))) > config.MAX_SOCKET_PATH:
            raise ConfigError(
                f"resource {name}: socket path {config.socket_path(name)} is longer than "
                f"{config.MAX_SOCKET_PATH} bytes; use a shorter --kubelet-socket directory"
            )
    return Plan(tuple(sorted(resources.values(), key=lambda r: r.name)), (*devices, *dra))
