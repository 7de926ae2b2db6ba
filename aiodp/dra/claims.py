"""What a DRA claim gets on this node (pure): from the ResourceClaim's allocation to the
devices we answer with and the transient CDI spec that hands them to the container.

Every problem is this claim's error (a `ClaimError` with a message naming the device), never
the batch's. The CDI spec carries the same edits `Allocate` gives a device-plugin container
(NVIDIA_VISIBLE_DEVICES, the gdrcopy/GDS/MOFED and IMEX variables, and every device node).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiodp.config.model import Config
from aiodp.gpus import edits
from aiodp.gpus.devices import Device, Health, Inventory, Resource
from aiodp.kit.errors import brief, cut, cut_text

CDI_VERSION: Final = "0.6.0"
MAX_RESULTS: Final = 128
"""Devices one claim may hold on this node (a node has at most a few dozen DRA devices)."""
CONFIG_KINDS: Final = ("gpu.aiodp.io/v1alpha1", "resource.nvidia.com/v1beta1")
"""Opaque config apiVersions accepted: ours, and NVIDIA's GpuConfig for a migrating claim."""


class ClaimError(Exception):
    """This claim cannot be prepared; the message goes into the claim's `error`."""


@dataclass(frozen=True, slots=True)
class ClaimRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} ({self.uid})"


@dataclass(frozen=True, slots=True)
class PreparedDevice:
    requests: tuple[str, ...]
    pool: str
    device: str
    cdi_id: str
    uuid: str


@dataclass(frozen=True, slots=True)
class MpsAsk:
    """A claim's MPS daemon: its GPUs, limits and directories (`<mpsRoot>/claim-<uid>`)."""

    gpus: tuple[str, ...]
    threads: int | None
    pinned_mib: int | None
    root: str
    shm_dir: str

    @property
    def pipe_dir(self) -> str:
        return f"{self.root}/pipe"


@dataclass(frozen=True, slots=True)
class Prepared:
    claim: ClaimRef
    devices: tuple[PreparedDevice, ...]
    spec: Mapping[str, Any]
    """The claim's CDI spec (written to `<cdi dir>/<spec_name>`)."""
    time_slices: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """GPU UUID -> the time slice its config asks (NVIDIA's 1 Short, 2 Medium, 3 Long);
    GPUs at Default are not listed."""
    mps: MpsAsk | None = None
    """The claim's own MPS daemon, where its config asks MPS."""

    @property
    def spec_name(self) -> str:
        return spec_file_name(self.claim.uid)


def cdi_kind(driver: str) -> str:
    """The CDI kind of our claim specs: `k8s.gpu.aiodp.io/claim` (NVIDIA's is
    `k8s.gpu.nvidia.com/claim`)."""
    return f"k8s.{driver}/claim"


def spec_file_name(uid: str) -> str:
    return f"aiodp-claim_{uid}.json"


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


INTERVALS: Final = ("Default", "Short", "Medium", "Long")
"""NVIDIA's GpuConfig time-slice intervals."""
_QUANTITY: Final = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?$")
_UNITS: Final = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
                 "Pi": 1 << 50, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "P": 10**15}  # fmt: skip


def _bytes(where: str, value: object) -> int:
    """A Kubernetes quantity (`10Gi`, `512M`, a number of bytes) in bytes; ClaimError naming
    `where` when it is not one."""
    m = _QUANTITY.match(str(value).strip()) if isinstance(value, str | int) else None
    if m is None or isinstance(value, bool):
        raise ClaimError(f"{where}: must be a quantity such as 10Gi, got {cut(value)}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _check_mps(where: str, mps: object, memory_mib: int) -> tuple[int | None, int | None]:
    """NVIDIA's mpsConfig limits, (thread percentage, pinned MiB): a percentage of 1 to 100,
    pinned memory within the GPU's; each wrong one is this claim's error naming the field."""
    if mps is None:
        return None, None
    if not isinstance(mps, Mapping):
        raise ClaimError(f"{where}: must be an object, got {cut(mps)}")
    threads = mps.get("defaultActiveThreadPercentage")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 100
    ):
        raise ClaimError(
            f"{where}.defaultActiveThreadPercentage: must be an integer from 1 to 100, "
            f"got {cut(threads)}"
        )
    limits: list[tuple[str, object]] = []
    if mps.get("defaultPinnedDeviceMemoryLimit") is not None:
        limits.append(("defaultPinnedDeviceMemoryLimit", mps["defaultPinnedDeviceMemoryLimit"]))
    per_device = mps.get("defaultPerDevicePinnedMemoryLimit") or {}
    if not isinstance(per_device, Mapping):
        raise ClaimError(
            f"{where}.defaultPerDevicePinnedMemoryLimit: must map devices to quantities, "
            f"got {cut(per_device)}"
        )
    limits += [(f"defaultPerDevicePinnedMemoryLimit[{cut(k)}]", v)
               for k, v in list(per_device.items())[:64]]  # fmt: skip
    pinned = None
    for field, value in limits:
        mib = _bytes(f"{where}.{field}", value) >> 20
        if memory_mib and mib > memory_mib:
            raise ClaimError(
                f"{where}.{field}: {mib} MiB is more than the GPU's memory ({memory_mib} MiB)"
            )
        pinned = mib if pinned is None else min(pinned, mib)
    return (threads if isinstance(threads, int) else None), pinned


@dataclass(frozen=True, slots=True)
class ClaimSharing:
    """What a claim's GpuConfig asks, by request (`*`: a config naming no request)."""

    time_slices: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """request -> time slice 1-3 (Default is not listed)."""
    mps: Mapping[str, tuple[int | None, int | None]] = dataclasses.field(default_factory=dict)
    """request -> (active thread percentage, pinned MiB) of its MPS daemon."""


def check_config(
    configs: Sequence[Any], driver: str, requests: set[str], memory_mib: int = 0
) -> ClaimSharing:
    """The claim's opaque config for our driver, checked: GpuConfig with TimeSlicing (its
    interval, by request: `{}` for all requests) or no sharing; MPS limits are checked
    (within 100 % and the GPU's `memory_mib`) before MPS itself is refused; ClaimError
    otherwise."""
    slices: dict[str, int] = {}
    mps_asked: dict[str, tuple[int | None, int | None]] = {}
    for i, entry in enumerate(configs[:32]):
        opaque = _get(entry, "opaque")
        if not isinstance(opaque, Mapping) or opaque.get("driver") != driver:
            continue
        applies = _get(entry, "requests") or []
        if applies and not requests & set(map(str, applies)):
            continue
        where = f"config[{i}].opaque.parameters"
        params = opaque.get("parameters")
        if not isinstance(params, Mapping):
            raise ClaimError(f"{where}: must be an object, got {cut(params)}")
        if params.get("apiVersion") not in CONFIG_KINDS or params.get("kind") != "GpuConfig":
            raise ClaimError(
                f"{where}: apiVersion/kind {cut(params.get('apiVersion'))}/"
                f"{cut(params.get('kind'))} is not one of {', '.join(CONFIG_KINDS)} GpuConfig"
            )
        sharing = params.get("sharing")
        if sharing is None:
            continue
        if not isinstance(sharing, Mapping):
            raise ClaimError(f"{where}.sharing: must be an object, got {cut(sharing)}")
        kind = sharing.get("strategy")
        if kind == "TimeSlicing":
            interval = _get(sharing, "timeSlicingConfig", "interval") or "Default"
            if interval not in INTERVALS:
                raise ClaimError(
                    f"{where}.sharing.timeSlicingConfig.interval: must be one of "
                    f"{', '.join(INTERVALS)}, got {cut(interval)}"
                )
            if interval != "Default":
                for req in map(str, applies or ["*"]):
                    slices[req] = INTERVALS.index(interval)
        elif kind == "MPS":
            limits = _check_mps(f"{where}.sharing.mpsConfig", sharing.get("mpsConfig"), memory_mib)
            for req in map(str, applies or ["*"]):
                mps_asked[req] = limits
        else:
            raise ClaimError(f"{where}.sharing.strategy: must be TimeSlicing, got {cut(kind)}")
    return ClaimSharing(slices, mps_asked)


def _asked(table: Mapping[str, Any], reqs: Sequence[str]) -> Any:
    """What `table` asks for a device of these requests (its own request's, else `*`'s)."""
    return next((table[r] for r in reqs if r in table), table.get("*"))


def prepare(
    ref: ClaimRef,
    claim: Mapping[str, Any],
    *,
    driver: str,
    pool: str,
    devices: Mapping[str, Device],
    inventory: Inventory,
    config: Config,
    control_paths: Sequence[str] = (),
    imex_channels: Sequence[int] = (),
) -> Prepared:
    """The claim's devices on this node and its CDI spec; raises ClaimError.

    `devices` maps our DRA device names to the registry's devices (health as of now)."""
    uid = _get(claim, "metadata", "uid")
    if uid != ref.uid:
        raise ClaimError(
            f"claim {ref.namespace}/{ref.name} has uid {cut(uid)}, not {ref.uid}: it was "
            "deleted and created again"
        )
    results = _get(claim, "status", "allocation", "devices", "results")
    if not isinstance(results, list):
        raise ClaimError(f"claim {ref.namespace}/{ref.name} is not allocated")
    ours = [r for r in results if isinstance(r, Mapping) and r.get("driver") == driver]
    if not ours:
        raise ClaimError(f"claim {ref.namespace}/{ref.name} has no device of driver {driver}")
    if len(ours) > MAX_RESULTS:
        raise ClaimError(f"claim has {len(ours)} devices of {driver}, more than {MAX_RESULTS}")
    chosen: dict[str, tuple[Device, list[str]]] = {}
    foreign, unknown, sick = [], [], []
    for r in ours:
        name, where = str(r.get("device", "")), str(r.get("pool", ""))
        if where != pool:
            foreign.append(f"{cut_text(where, 64)}/{cut_text(name, 64)}")
            continue
        dev = devices.get(name)
        if dev is None:
            unknown.append(cut_text(name, 64))
            continue
        if dev.health is not Health.HEALTHY:
            sick.append(f"{name} ({dev.uuid}): {dev.reason or 'Unhealthy'}")
        chosen.setdefault(name, (dev, []))[1].append(str(r.get("request", "")))
    if foreign:
        raise ClaimError(f"device(s) {brief(foreign)} are not in this node's pool {pool}")
    if unknown:
        raise ClaimError(f"device(s) {brief(unknown)} are not published by {driver} on {pool}")
    if sick:
        raise ClaimError(f"device(s) unhealthy since allocation: {brief(sick)}")
    configs = _get(claim, "status", "allocation", "devices", "config") or []
    requests = {req for _, reqs in chosen.values() for req in reqs}
    memory = min((d.memory_mib for d, _ in chosen.values() if d.memory_mib), default=0)
    asked = check_config(configs if isinstance(configs, list) else [], driver, requests, memory)
    time_slices = {
        str(dev.uuid): _asked(asked.time_slices, reqs)
        for dev, reqs in chosen.values()
        if _asked(asked.time_slices, reqs) is not None
    }
    mps_devices = [dev for dev, reqs in chosen.values() if _asked(asked.mps, reqs) is not None]
    mps: MpsAsk | None = None
    if mps_devices:
        if config.mps_root is None:
            raise ClaimError("sharing.strategy MPS: needs MPS_ROOT (--mps-root) on this node")
        threads, pinned = next(
            _asked(asked.mps, reqs) for dev, reqs in chosen.values() if dev in mps_devices
        )
        mps = MpsAsk(
            tuple(sorted({str(d.gpu) for d in mps_devices})), threads, pinned,
            str(config.mps_root / f"claim-{ref.uid}"), str(config.mps_root / "shm"),
        )  # fmt: skip
    kind = cdi_kind(driver)
    prepared = tuple(
        PreparedDevice(
            requests=tuple(reqs),
            pool=pool,
            device=name,
            cdi_id=f"{kind}={ref.uid}-{name}",
            uuid=dev.uuid,
        )
        for name, (dev, reqs) in chosen.items()
    )
    spec = cdi_spec(
        ref, [(name, dev) for name, (dev, _) in chosen.items()], inventory, config,
        control_paths, imex_channels, driver,
    )  # fmt: skip
    if mps is not None:  # the claim's daemon: its pipe directory and shm, in every container
        edits = spec["containerEdits"]
        edits["env"] = [*edits["env"], f"CUDA_MPS_PIPE_DIRECTORY={mps.pipe_dir}"]
        edits["mounts"] = [
            {"hostPath": mps.pipe_dir, "containerPath": mps.pipe_dir, "options": ["rw", "bind"]},
            {"hostPath": mps.shm_dir, "containerPath": "/dev/shm", "options": ["rw", "bind"]},
        ]
    return Prepared(ref, prepared, spec, time_slices, mps)


def cdi_spec(
    ref: ClaimRef,
    devices: Sequence[tuple[str, Device]],
    inventory: Inventory,
    config: Config,
    control_paths: Sequence[str],
    imex_channels: Sequence[int],
    driver: str,
) -> dict[str, Any]:
    """The claim's transient CDI spec: each device its own node(s); the claim's environment
    and the shared control nodes in the spec-wide edits (what Allocate would give)."""
    as_allocate = dataclasses.replace(
        config, device_list_strategy=("envvar",), pass_device_specs=True
    )
    resource = devices[0][1].resource if devices else ""
    resp = edits.build(
        [d.id for _, d in devices], inventory, Resource(resource), as_allocate,
        control_paths, imex_channels,
    )  # fmt: skip
    own = {p for _, d in devices for p in d.paths}
    node = {s.container_path: s.host_path for s in resp.devices}

    def nodes(paths: Sequence[str]) -> list[dict[str, str]]:
        return [{"path": p, "hostPath": node.get(p, p)} for p in paths]

    def device_edits(name: str, d: Device) -> dict[str, Any]:
        if d.paths:
            return {"deviceNodes": nodes(d.paths)}
        # no device node (a simulated node without them): CDI refuses a device with no
        # edits at all, so it names itself in the environment
        return {"env": [f"AIODP_DRA_DEVICE_{name.upper().replace('-', '_')}={d.id}"]}

    return {
        "cdiVersion": CDI_VERSION,
        "kind": cdi_kind(driver),
        "devices": [
            {"name": f"{ref.uid}-{name}", "containerEdits": device_edits(name, d)}
            for name, d in devices
        ],
        "containerEdits": {
            "env": [f"{k}={v}" for k, v in sorted(resp.envs.items())],
            "deviceNodes": nodes([p for p in node if p not in own]),
        },
    }
