"""Which GPUs a simulated node has: the simulated-devices YAML file, re-read on every edit.

Format (see README):

    gpus:
      - uuid: GPU-8f2c...          # required, unique
        name: NVIDIA H100 80GB HBM3
        index: 0                   # default: position in the list
        minor: 0                   # default: index
        memory_mib: 81559
        numa_node: 0
        pci_bus_id: "0000:18:00.0"
        architecture: Hopper       # optional, published by DRA (ResourceSlice attributes):
        cuda_compute_capability: "9.0"  # also brand, driver_version, cuda_driver_version
        health: Healthy            # Healthy | Unhealthy
        reason: ""                 # optional, shown while Unhealthy
        mig_devices: [{uuid: MIG-..., profile: 1g.10gb, gi: 1, ci: 0}]
    nvlinks:
      - [0, 1, 4]                  # GPU index, GPU index, link count
    device_nodes: true             # false: the GPUs have no /dev/nvidia<minor> (a node without
                                   # them, where a runtime would refuse a missing device node)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, Self

import yaml

from aiodp.config import configfile
from aiodp.gpus import topology
from aiodp.gpus.backend import (
    CLOCK_EVENTS,
    NVLINK_ERRORS,
    DeviceInfo,
    GpuMetrics,
    HealthEvent,
    MigInfo,
    Probe,
)
from aiodp.gpus.devices import Health
from aiodp.kit.errors import BackendError, ConfigError, brief, cut, cut_text

log = logging.getLogger(__name__)

GPU_KEYS: Final = frozenset(
    {
        "uuid",
        "name",
        "index",
        "minor",
        "memory_mib",
        "numa_node",
        "pci_bus_id",
        "health",
        "reason",
        "mig_devices",
        "metrics",
        "brand",
        "architecture",
        "cuda_compute_capability",
        "driver_version",
        "cuda_driver_version",
        "mig_capable",
        "pci_class",
        "fabric",
        "pcie_root",
        "xids",
    }
)
MIG_KEYS: Final = frozenset(
    {"uuid", "profile", "gi", "ci", "metrics", "memory_mb", "multiprocessors", "gi_slices",
     "ci_slices", "engines", "placement"}
)  # fmt: skip
ENGINES: Final = ("copy", "decoder", "encoder", "jpeg", "ofa")
COMPUTE_CLASS: Final = 0x030200
"""A datacenter GPU's PCI class (3D controller): the simulated default."""
_IDENTITY: Final = (
    "brand", "architecture", "cuda_compute_capability", "driver_version", "cuda_driver_version"
)  # fmt: skip
MAX_XIDS: Final = 32
"""XIDs listed for one GPU (`xids:`): a fault-injection list, never long."""
MAX_PENDING_EVENTS: Final = 256
"""XID events reported and not yet taken by the health task; more are dropped with a line."""
MAX_TEXT: Final = 256
"""Characters in one text value (a UUID, a name, a reason): real ones are far shorter."""


class SimulatedFileError(ConfigError):
    """The simulated-devices file is not valid; the message names the key and value."""


@dataclass(frozen=True, slots=True)
class SimulatedNode:
    """The parsed content of a simulated-devices file."""

    gpus: tuple[DeviceInfo, ...]
    nvlinks: Mapping[frozenset[str], int]
    metrics: Mapping[str, GpuMetrics] = dataclasses.field(default_factory=dict)
    """Each GPU's `metrics:` block (live-editable like `health:`), by UUID."""
    xids: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    """Each GPU's `xids:` list, by UUID: an XID an edit adds is reported once as an event."""

    def topology(self) -> topology.Topology:
        return topology.build(
            [(g.uuid, g.index, g.numa_node) for g in self.gpus], nvlinks=self.nvlinks
        )


def _fail(where: str, msg: str) -> NoReturn:
    raise SimulatedFileError(f"{where}: {msg}")


def _int(where: str, value: object, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(where, f"must be an integer >= {minimum}, got {cut(value)}")
    return value


def _flag(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        _fail(where, f"must be true or false, got {cut(value)}")
    return value


def _str(where: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(where, f"must be a non-empty string, got {cut(value)}")
    return _short(where, value.strip())


def _short(where: str, value: str) -> str:
    if len(value) > MAX_TEXT:
        _fail(where, f"must be at most {MAX_TEXT} characters, got {len(value)}: {cut(value)}")
    return value


def _opt(where: str, value: object, default: str) -> str:
    """An optional text value (a name, a reason): any scalar, bounded."""
    if value is None or value == "":
        return default
    if isinstance(value, dict | list):
        _fail(where, f"must be text, got {cut(value)}")
    return _short(where, str(value))


def parse(text: str, source: str = "simulated devices") -> SimulatedNode:
    """Parse and validate the file's text; raises SimulatedFileError naming the problem."""
    try:
        doc: Any = configfile.load_yaml(text)
    except yaml.YAMLError as e:
        _fail(source, "invalid YAML: " + cut_text(str(e).replace("\n", " "), 300))
    if not isinstance(doc, dict):
        _fail(source, f"must be a mapping with a 'gpus' list, got {type(doc).__name__}")
    unknown = sorted(set(doc) - {"gpus", "nvlinks", "device_nodes"})
    if unknown:
        _fail(source, f"unknown key(s) {brief([str(k) for k in unknown])}")
    nodes = _flag(f"{source}: device_nodes", doc.get("device_nodes", True))
    raw_gpus = doc.get("gpus")
    if not isinstance(raw_gpus, list):
        _fail(f"{source}: gpus", f"must be a list, got {cut(raw_gpus)}")
    gpus: list[DeviceInfo] = []
    metrics: dict[str, GpuMetrics] = {}
    xids: dict[str, tuple[int, ...]] = {}
    seen_uuid: set[str] = set()
    seen_index: set[int] = set()
    for pos, g in enumerate(raw_gpus):
        where = f"{source}: gpus[{pos}]"
        if not isinstance(g, dict):
            _fail(where, f"must be a mapping, got {cut(g)}")
        bad = sorted(set(map(str, g)) - GPU_KEYS)
        if bad:
            _fail(where, f"unknown key(s) {brief(bad)}")
        if "uuid" not in g:
            _fail(f"{where}.uuid", "is required")
        uuid = _str(f"{where}.uuid", g["uuid"])
        if uuid in seen_uuid:
            _fail(f"{where}.uuid", f"duplicate uuid {cut(uuid)}")
        index = _int(f"{where}.index", g.get("index", pos))
        if index in seen_index:
            _fail(f"{where}.index", f"duplicate index {index}")
        minor = _int(f"{where}.minor", g.get("minor", index))
        numa = g.get("numa_node")
        if numa is not None:
            numa = _int(f"{where}.numa_node", numa)
        health_raw = g.get("health", "Healthy")
        try:
            health = Health(health_raw)
        except ValueError:
            _fail(f"{where}.health", f"must be Healthy or Unhealthy, got {cut(health_raw)}")
        fault = "simulated fault" if health is Health.UNHEALTHY else ""
        reason = _opt(f"{where}.reason", g.get("reason"), fault)
        seen_uuid.add(uuid)
        migs = _mig_devices(f"{where}.mig_devices", g.get("mig_devices") or [], index, seen_uuid)
        for pos, m in enumerate(g.get("mig_devices") or []):
            if m.get("metrics") is not None:
                at = f"{where}.mig_devices[{pos}].metrics"
                metrics[migs[pos].uuid] = _metrics(at, m["metrics"])
        seen_index.add(index)
        if g.get("metrics") is not None:
            metrics[uuid] = _metrics(f"{where}.metrics", g["metrics"])
        if g.get("xids") is not None:
            xids[uuid] = _xids(f"{where}.xids", g["xids"])
        gpus.append(
            DeviceInfo(
                uuid=uuid,
                index=index,
                minor=minor,
                name=_opt(f"{where}.name", g.get("name"), "Simulated GPU"),
                memory_mib=_int(f"{where}.memory_mib", g.get("memory_mib", 0)),
                numa_node=numa,
                pci_bus_id=_opt(f"{where}.pci_bus_id", g.get("pci_bus_id"), ""),
                paths=(f"/dev/nvidia{minor}",) if nodes else (),
                mig_enabled=bool(migs),
                mig_devices=migs,
                health=health,
                reason=reason,
                mig_capable=_flag(f"{where}.mig_capable", g.get("mig_capable", bool(migs))),
                pci_class=_int(f"{where}.pci_class", g.get("pci_class", COMPUTE_CLASS)),
                fabric=_opt(f"{where}.fabric", g.get("fabric"), ""),
                pcie_root=_opt(f"{where}.pcie_root", g.get("pcie_root"), ""),
                **{k: _opt(f"{where}.{k}", g.get(k), "") for k in _IDENTITY},
            )
        )
    by_index = {g.index: g.uuid for g in gpus}
    nvlinks: dict[frozenset[str], int] = {}
    raw_links = doc.get("nvlinks") or []
    if not isinstance(raw_links, list):
        _fail(f"{source}: nvlinks", f"must be a list, got {cut(raw_links)}")
    for pos, link in enumerate(raw_links):
        where = f"{source}: nvlinks[{pos}]"
        if not isinstance(link, list) or len(link) != 3:
            _fail(where, f"must be [gpu index, gpu index, link count], got {cut(link)}")
        a, b = (_int(where, v) for v in link[:2])
        count = _int(where, link[2], minimum=1)
        if a not in by_index or b not in by_index or a == b:
            _fail(where, f"must join two different known GPU indexes, got {cut(link)}")
        nvlinks[frozenset((by_index[a], by_index[b]))] = count
    return SimulatedNode(tuple(sorted(gpus, key=lambda g: g.index)), nvlinks, metrics, xids)


def _xids(where: str, value: object) -> tuple[int, ...]:
    """`xids: [79, 48]`: XID codes, at most MAX_XIDS."""
    if not isinstance(value, list):
        _fail(where, f"must be a list of XID numbers, got {cut(value)}")
    if len(value) > MAX_XIDS:
        _fail(where, f"must list at most {MAX_XIDS} XIDs, got {len(value)}")
    return tuple(_int(f"{where}[{i}]", x) for i, x in enumerate(value))


METRIC_KEYS: Final = frozenset(
    f.name
    for f in dataclasses.fields(GpuMetrics)
    if f.name not in ("clock_events", "nvlink_errors")
)


def _metrics(where: str, raw: object) -> GpuMetrics:
    """A GPU's `metrics:` block: numbers by GpuMetrics field name, `clock_events` a list of
    NVIDIA's reasons, `nvlink_errors` a mapping of counter to number."""
    if not isinstance(raw, dict):
        _fail(where, f"must be a mapping, got {cut(raw)}")
    values: dict[str, object] = {}
    for key, value in raw.items():
        at = f"{where}.{cut_text(str(key))}"
        if key in METRIC_KEYS:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                _fail(at, f"must be a number >= 0, got {cut(value)}")
            values[key] = float(value)
        elif key == "clock_events":
            if not isinstance(value, list) or any(v not in CLOCK_EVENTS for v in value):
                _fail(at, f"must list some of {', '.join(CLOCK_EVENTS)}, got {cut(value)}")
            values[key] = frozenset(value)
        elif key == "nvlink_errors":
            if not isinstance(value, dict) or not all(
                k in NVLINK_ERRORS and isinstance(v, int | float) and not isinstance(v, bool)
                for k, v in value.items()
            ):
                _fail(at, f"must map some of {', '.join(NVLINK_ERRORS)} to numbers, "
                      f"got {cut(value)}")  # fmt: skip
            values[key] = {k: float(v) for k, v in value.items()}
        else:
            _fail(at, "unknown metric")
    return GpuMetrics(**values)  # type: ignore[arg-type]


def _mig_devices(where: str, raw: object, parent: int, seen: set[str]) -> tuple[MigInfo, ...]:
    if not isinstance(raw, list):
        _fail(where, f"must be a list, got {cut(raw)}")
    out = []
    for pos, m in enumerate(raw):
        at = f"{where}[{pos}]"
        if not isinstance(m, dict):
            _fail(at, f"must be a mapping, got {cut(m)}")
        bad = sorted(set(map(str, m)) - MIG_KEYS)
        if bad:
            _fail(at, f"unknown key(s) {brief(bad)}")
        uuid = _str(f"{at}.uuid", m.get("uuid"))
        if uuid in seen:
            _fail(f"{at}.uuid", f"duplicate uuid {cut(uuid)}")
        seen.add(uuid)
        gi = _int(f"{at}.gi", m.get("gi"))
        ci = _int(f"{at}.ci", m.get("ci"))
        paths = (
            f"/dev/nvidia-caps/nvidia-cap{gi}",
            f"/dev/nvidia-caps/nvidia-cap{ci}",
        )
        profile = _str(f"{at}.profile", m.get("profile"))
        slices, memory = _profile_defaults(profile)
        engines_raw = m.get("engines") or {}
        if not isinstance(engines_raw, dict) or set(map(str, engines_raw)) - set(ENGINES):
            _fail(
                f"{at}.engines", f"must map {', '.join(ENGINES)} to counts, got {cut(engines_raw)}"
            )
        engines = tuple(_int(f"{at}.engines.{e}", engines_raw.get(e, 0)) for e in ENGINES)
        out.append(
            MigInfo(
                uuid, profile, gi, ci, pos, paths,
                memory_mb=_int(f"{at}.memory_mb", m.get("memory_mb", memory)),
                multiprocessors=_int(f"{at}.multiprocessors", m.get("multiprocessors", 0)),
                gi_slices=_int(f"{at}.gi_slices", m.get("gi_slices", slices)),
                ci_slices=_int(f"{at}.ci_slices", m.get("ci_slices", slices)),
                engines=engines,  # type: ignore[arg-type]
                placement=_placement(f"{at}.placement", m.get("placement")),
            )
        )  # fmt: skip
    return tuple(out)


def _placement(where: str, value: object) -> tuple[int, int]:
    """`[first memory slice, slices]` of a MIG device's GPU instance; absent: unknown."""
    if value is None:
        return 0, 0
    if not isinstance(value, list) or len(value) != 2:
        _fail(where, f"must be [first memory slice, slices], got {cut(value)}")
    return _int(where, value[0]), _int(where, value[1])


def _profile_defaults(profile: str) -> tuple[int, int]:
    """Slices and memory (MB) a profile name says: `2g.20gb` -> (2, 20480); (0, 0) if odd."""
    parts = profile.replace("+", ".").split(".")
    try:
        slices = int(parts[0].rstrip("g"))
        memory = int(next(p for p in parts if p.endswith("gb"))[:-2]) * 1024
    except (ValueError, StopIteration):
        return 0, 0
    return slices, memory


class SimulatedBackend:
    """A DeviceBackend over the simulated-devices file; `reload()` applies an edit.

    A bad edit is refused with a log line and the last good content stays.
    """

    name: Final = "simulated"

    def __init__(self, path: Path, *, max_bytes: int = configfile.MAX_FILE_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._node: SimulatedNode | None = None
        self._text: str | None = None
        self._events: asyncio.Queue[HealthEvent] = asyncio.Queue(MAX_PENDING_EVENTS)

    async def __aenter__(self) -> Self:
        self._text, self._node = await asyncio.to_thread(self._load, None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def _load(self, unless: str | None) -> tuple[str, SimulatedNode | None]:
        """Read (bounded) and parse the file, in a thread; no parse when the text is `unless`."""
        try:
            text = configfile.read_bounded(self.path, self.max_bytes)
        except OSError as e:
            raise SimulatedFileError(f"{self.path}: cannot read: {e.strerror or e}") from None
        except configfile.ConfigFileError as e:
            raise SimulatedFileError(f"{self.path}: {e}") from None
        if text == unless:
            return text, None
        return text, parse(text, str(self.path))

    @property
    def node(self) -> SimulatedNode:
        if self._node is None:
            raise RuntimeError("SimulatedBackend used outside 'async with'")
        return self._node

    async def reload(self) -> bool:
        """Re-read the file; True when it changed and is valid, False otherwise."""
        try:
            text, node = await asyncio.to_thread(self._load, self._text)
            if node is None:
                return False
        except SimulatedFileError as e:
            log.warning("simulated devices: edit rejected, keeping the last good list: %s", e)
            return False
        old, self._node, self._text = self._node, node, text
        log.info("simulated devices: reloaded %s (%d GPUs)", self.path, len(node.gpus))
        self._report_new_xids(old, node)
        return True

    def _report_new_xids(self, old: SimulatedNode | None, new: SimulatedNode) -> None:
        """Each XID an edit added to a GPU's list, reported once (as NVML's event set would)."""
        before = old.xids if old is not None else {}
        for uuid, codes in new.xids.items():
            for xid in sorted(set(codes) - set(before.get(uuid, ()))):
                try:
                    self._events.put_nowait(HealthEvent(uuid, f"XID {xid}", xid=xid))
                except asyncio.QueueFull:
                    log.warning("simulated devices: XID %d of %s dropped (%d events pending)",
                                xid, uuid, MAX_PENDING_EVENTS)  # fmt: skip

    async def discover(self) -> Sequence[DeviceInfo]:
        return self.node.gpus

    async def probe_health(self, ids: Collection[str]) -> Mapping[str, Probe]:
        # The file states health outright (fault injection): no recovery period applies.
        return {
            g.uuid: Probe(g.health, g.reason, recovers_at_once=True)
            for g in self.node.gpus
            if not ids or g.uuid in ids
        }

    async def health_events(self) -> AsyncGenerator[HealthEvent, None]:
        """The XIDs edits add to the file's `xids:` lists: device faults, so the recovery
        period applies to them (unlike `health:`, which the file states outright)."""
        while True:
            yield await self._events.get()

    async def topology(self) -> topology.Topology:
        return self.node.topology()

    async def set_compute_mode(self, uuids: Collection[str], exclusive: bool) -> None:
        raise BackendError("the simulated backend has no GPUs whose compute mode could be set")

    async def read_metrics(self) -> Mapping[str, GpuMetrics]:
        return self.node.metrics
