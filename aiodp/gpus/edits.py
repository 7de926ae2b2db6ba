"""What a container receives for the devices chosen: its container edits (pure).

The environment, mounts, device nodes, CDI names and annotations of one container request,
as plain values: the device plugin turns them into a ContainerAllocateResponse, the DRA
driver into a claim's CDI spec.

Mirrors NVIDIA's plugin per device-list strategy: CDI names first (annotations and/or the
`cdi_devices` field); when only CDI strategies are on, nothing else. Otherwise
`NVIDIA_VISIBLE_DEVICES` as a list (`envvar`) or as a directory of `/dev/null` mounts
(`volume-mounts`), and, with `pass_device_specs`, the device nodes.
"""

from __future__ import annotations

import collections
import dataclasses
import uuid
from collections.abc import Sequence
from typing import Final

from aiodp.config.model import AllocationPolicy, Config
from aiodp.gpus import topology
from aiodp.gpus.devices import Device, Health, Inventory, Kind, Resource, imex_channel_path
from aiodp.kit.errors import InvalidRequest, UnhealthyDevice, UnknownDevice, cut_text

VISIBLE_DEVICES: Final = "NVIDIA_VISIBLE_DEVICES"
IMEX_CHANNELS: Final = "NVIDIA_IMEX_CHANNELS"
CDI_KEY_NAMESPACE: Final = uuid.UUID("6f1d2e0a-5c1b-4e8f-9a51-61a0d90c0a51")
VOLUME_MOUNT_DIR: Final = "/var/run/nvidia-container-devices"
CDI_STRATEGIES: Final = frozenset({"cdi-annotations", "cdi-cri"})


@dataclasses.dataclass(frozen=True, slots=True)
class Mount:
    """A host path bind-mounted into the container."""

    container_path: str
    host_path: str


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceNode:
    """A device node handed to the container."""

    container_path: str
    host_path: str
    permissions: str = "rw"


@dataclasses.dataclass(slots=True)
class ContainerEdits:
    """What one container request gets, filled in by `build` (in the order NVIDIA's plugin
    adds them)."""

    envs: dict[str, str] = dataclasses.field(default_factory=dict)
    mounts: list[Mount] = dataclasses.field(default_factory=list)
    devices: list[DeviceNode] = dataclasses.field(default_factory=list)
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    cdi_devices: list[str] = dataclasses.field(default_factory=list)


MAX_ID_LENGTH: Final = 256
"""No real device ID is longer: a MIG UUID is 40 characters, a replica adds `::<n>`."""
MIN_ID_CAP: Final = 64
ID_MARGIN: Final = 4
"""A request may name at most this many times the node's devices (at least MIN_ID_CAP)."""
MAX_CONTAINERS: Final = 256
"""Container requests in one call; a pod with more containers than this is not real."""


def check_request(ids: Sequence[str], inventory: Inventory) -> None:
    """Refuse absurd requests before any work: too many IDs, or an ID longer than any real
    one (INVALID_ARGUMENT, the sizes named, the ID quoted cut short)."""
    cap = max(MIN_ID_CAP, ID_MARGIN * len(inventory.devices))
    if len(ids) > cap:
        raise InvalidRequest(
            f"{len(ids)} device IDs in one request; this node has {len(inventory.devices)} "
            f"devices (at most {cap} accepted)"
        )
    for i in ids:
        if len(i) > MAX_ID_LENGTH:
            raise InvalidRequest(
                f"device ID of {len(i)} characters (at most {MAX_ID_LENGTH}): {cut_text(i)}"
            )


def check_containers(count: int) -> None:
    if count > MAX_CONTAINERS:
        raise InvalidRequest(f"{count} container requests in one call (at most {MAX_CONTAINERS})")


def known(ids: Sequence[str], inventory: Inventory, resource: str) -> list[Device]:
    """The named devices of `resource`, de-duplicated in order; unknown ones raise."""
    check_request(ids, inventory)
    found = {i: inventory.get(i) for i in dict.fromkeys(ids)}
    unknown = [i for i, d in found.items() if d is None or d.resource != resource]
    if unknown:
        raise UnknownDevice(unknown)
    return [d for d in found.values() if d is not None]


def resolve_ids(ids: Sequence[str], inventory: Inventory, resource: str) -> list[Device]:
    """The requested devices, de-duplicated in order; unknown or Unhealthy ones raise."""
    devices = known(ids, inventory, resource)
    sick = [d for d in devices if d.health is not Health.HEALTHY]
    if sick:
        raise UnhealthyDevice([d.id for d in sick], [f"{d.id}: {d.reason}" for d in sick])
    return devices


def preferred(
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    inventory: Inventory,
    resource: str,
    topo: topology.Topology,
    policy: AllocationPolicy,
) -> list[str]:
    """The IDs the kubelet should pick: whole GPUs by topology, replicas and MIG devices by
    the shared-devices policy (spread over or packed onto GPUs); unknown IDs raise."""
    known([*available, *must_include], inventory, resource)
    avail = list(dict.fromkeys(available))
    must = list(dict.fromkeys(must_include))
    devices = inventory.for_resource(resource)
    if all(d.kind is Kind.GPU for d in devices):
        return topology.preferred(avail, must, size, topo)
    group: dict[str, str] = {d.id: d.uuid if d.kind is Kind.REPLICA else d.gpu for d in devices}
    totals = collections.Counter(group.values())
    order: dict[str, int] = {d.id: i for i, d in enumerate(devices)}
    return topology.preferred_grouped(avail, must, size, group, totals, order, policy)


def visible_ids(devices: Sequence[Device], config: Config) -> list[str]:
    """The IDs the runtime sees: unique GPU/MIG UUIDs (replicas collapse), or indexes."""
    out = [d.index if config.device_id_strategy == "index" else d.uuid for d in devices]
    return list(dict.fromkeys(out))


def cdi_annotation_key(prefix: str, resource: str, ids: Sequence[str]) -> str:
    """NVIDIA's key format, `<prefix>nvidia-device-plugin_<uuid>`, with a UUID derived from
    the request instead of a random one, so that the answer stays the same (idempotent)."""
    key = uuid.uuid5(CDI_KEY_NAMESPACE, resource + "|" + ",".join(ids))
    return f"{prefix}nvidia-device-plugin_{key}"


def build(
    ids: Sequence[str],
    inventory: Inventory,
    resource: Resource,
    config: Config,
    control_paths: Sequence[str] = (),
    imex_channels: Sequence[int] = (),
) -> ContainerEdits:
    """The edits for one container request; the same request gives the same edits.

    `imex_channels` are the configured IMEX channels whose device nodes exist."""
    devices = resolve_ids(ids, inventory, resource.name)
    if (
        resource.fail_requests_greater_than_one
        and len(devices) > 1
        and any(d.kind is Kind.REPLICA for d in devices)
    ):
        raise InvalidRequest(
            f"request for {len(devices)} {resource.name} devices too large: "
            "the maximum for a shared resource is 1 (failRequestsGreaterThanOne)"
        )
    visible = visible_ids(devices, config)
    strategies = config.device_list_strategy
    resp = ContainerEdits()
    vendor = config.cdi_kind.partition("/")[0]
    cdi_names = [f"{config.cdi_kind}={v}" for v in visible]
    cdi_names += [f"{vendor}/imex-channel={c}" for c in imex_channels]
    if "cdi-annotations" in strategies:
        key = cdi_annotation_key(config.cdi_annotation_prefix, resource.name, visible)
        resp.annotations[key] = ",".join(cdi_names)
    if "cdi-cri" in strategies:
        resp.cdi_devices = list(cdi_names)
    if resource.sharing == "mps":
        _add_mps(resp, resource, devices, config)
    for enabled, name in (
        (config.gdrcopy_enabled, "NVIDIA_GDRCOPY"),
        (config.gds_enabled, "NVIDIA_GDS"),
        (config.mofed_enabled, "NVIDIA_MOFED"),
    ):
        if enabled:
            resp.envs[name] = "enabled"
    if set(strategies) <= CDI_STRATEGIES:
        return resp
    if "envvar" in strategies:
        resp.envs[VISIBLE_DEVICES] = ",".join(visible)
        if imex_channels:
            resp.envs[IMEX_CHANNELS] = ",".join(str(c) for c in imex_channels)
    if "volume-mounts" in strategies:
        resp.envs[VISIBLE_DEVICES] = VOLUME_MOUNT_DIR
        resp.mounts.extend(
            Mount(container_path=f"{VOLUME_MOUNT_DIR}/{v}", host_path="/dev/null") for v in visible
        )
        resp.mounts.extend(
            Mount(container_path=f"{VOLUME_MOUNT_DIR}/imex/{c}", host_path="/dev/null")
            for c in imex_channels
        )
    if config.pass_device_specs:
        paths = list(control_paths)
        for d in devices:
            paths.extend(d.paths)
        paths.extend(imex_channel_path(c) for c in imex_channels)
        root = str(config.dev_root).rstrip("/")
        resp.devices = [
            DeviceNode(container_path=p, host_path=root + p, permissions="rw")
            for p in dict.fromkeys(paths)
        ]
    return resp


def _add_mps(
    resp: ContainerEdits, resource: Resource, devices: Sequence[Device], config: Config
) -> None:
    """NVIDIA's MPS environment and mounts, plus the per-client limits of one replica."""
    pipe = f"/mps/{resource.name}/pipe"
    root = str(config.mps_root or "").rstrip("/")
    resp.envs["CUDA_MPS_PIPE_DIRECTORY"] = pipe
    resp.mounts.append(Mount(container_path=pipe, host_path=f"{root}/{resource.name}/pipe"))
    resp.mounts.append(Mount(container_path="/dev/shm", host_path=f"{root}/shm"))
    replicas = max(resource.replicas, 1)
    resp.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // replicas)
    limits = [
        f"{i}={d.memory_mib // replicas}M"
        for i, d in enumerate(dict((d.uuid, d) for d in devices).values())
        if d.memory_mib
    ]
    if limits:
        resp.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(limits)
