"""Which GPUs this node really has, and how they are: NVML, the only importer of `pynvml`.

Every NVML call runs off the event loop: one single-worker executor for calls, one thread
for event waits (at most 1 s each, results handed to the loop with call_soon_threadsafe).
`pynvml.NVMLError` becomes `BackendUnavailable` (NVML as a whole) or an Unhealthy probe
(one GPU) at this boundary.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import re
import threading
import uuid as uuid_module
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Self, TypedDict, cast

import aiofiles
import pynvml

from aiodp.gpus import nvmlcounters, topology
from aiodp.gpus.backend import (
    LOST,
    DeviceInfo,
    GpuMetrics,
    HealthEvent,
    MigInfo,
    Probe,
    sysfs_bdf,
)
from aiodp.gpus.devices import Health
from aiodp.kit import metrics
from aiodp.kit.errors import BackendError, BackendUnavailable

log = logging.getLogger(__name__)

NO_INSTANCE: Final = 0xFFFFFFFF
"""gpuInstanceId / computeInstanceId of an event that concerns the whole GPU."""
EVENT_WAIT_MS: Final = 1000

# NVML error codes (pynvml's NVML_ERROR_*), by what they mean for us.
GPU_GONE: Final = frozenset({15, 16, 28, 999})  # GPU_IS_LOST, RESET_REQUIRED, NOT_FOUND, UNKNOWN
NVML_GONE: Final = frozenset(
    {1, 9, 12, 18}
)  # UNINITIALIZED, DRIVER_NOT_LOADED, LIB_NOT_FOUND, RM_MISMATCH
NOT_SUPPORTED: Final = nvmlcounters.NOT_SUPPORTED
FEATURE_ENABLED: Final = 1
_PCIE_ROOT: Final = re.compile(r"pci[0-9a-f]{4}:[0-9a-f]{2}")
"""A root complex in a sysfs device path: `pci0000:17`."""
FABRIC_STATE_COMPLETED: Final = 3  # NVML_GPU_FABRIC_STATE_COMPLETED
COMPUTE_DEFAULT: Final = 0  # NVML_COMPUTEMODE_DEFAULT
COMPUTE_EXCLUSIVE_PROCESS: Final = 3  # NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
NOT_FOUND: Final = 6
TIMEOUT: Final = 10

# Arguments of the metric readings: values fixed by NVML's C ABI (nvml.h).
MAX_NVLINKS: Final = 36  # NVML_NVLINK_MAX_LINKS (NVML 12)

PCIE_RELATION: Final[Mapping[int, str]] = {
    0: "board",  # NVML_TOPOLOGY_INTERNAL
    10: "single-switch",
    20: "multiple-switches",
    30: "host-bridge",
    40: "numa",  # NVML_TOPOLOGY_NODE
    50: "system",
}


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Identity(TypedDict, total=False):
    brand: str
    architecture: str
    cuda_compute_capability: str
    driver_version: str
    cuda_driver_version: str


def _cuda_version(value: int) -> str:
    """NVML's CUDA driver version integer (12090) as `12.9`."""
    return f"{value // 1000}.{value % 1000 // 10}"


def mig_profile(gi_slices: int, ci_slices: int, memory_mb: int) -> str:
    """NVIDIA's MIG profile name: `1g.10gb`, or `1c.2g.20gb` for a partial compute instance."""
    gb = math.ceil(memory_mb / 1024)
    if ci_slices and ci_slices != gi_slices:
        return f"{ci_slices}c.{gi_slices}g.{gb}gb"
    return f"{gi_slices}g.{gb}gb"


class NvmlBackend:
    """A DeviceBackend over NVML. `nvml` is the pynvml module (tests pass a fake one).

    It is given only where to read what NVML does not say: `sys_root` (a GPU's NUMA node)
    and `proc_root` (MIG capability device minors).
    """

    name: Final = "nvml"

    def __init__(
        self,
        *,
        sys_root: Path = Path("/sys"),
        proc_root: Path = Path("/proc"),
        nvml: ModuleType | Any = None,
    ) -> None:
        self.sys_root = sys_root
        self.proc_root = proc_root
        self.n: Any = nvml if nvml is not None else pynvml
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._infos: tuple[DeviceInfo, ...] = ()
        self._topology = topology.Topology()
        self._stop_events = threading.Event()
        self._event_thread: threading.Thread | None = None
        self._broken: str | None = None
        self._counters = nvmlcounters.Counters(self.n, self._active_links)
        """Set while NVML as a whole fails; the next probe tries to initialise it again."""

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nvml")
        try:
            await self._call(self.n.nvmlInit)
        except self.n.NVMLError as e:
            self._pool.shutdown(wait=False)
            self._pool = None
            metrics.observe_nvml_error("nvmlInit")
            metrics.set_backend_state("nvml", False)
            raise BackendUnavailable(f"NVML initialisation failed: {e}") from None
        metrics.set_backend_state("nvml", True)
        version = await self._call(self.n.nvmlSystemGetDriverVersion)
        log.info("NVML initialised (driver %s)", _str(version))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_event_thread()
        if self._pool is None:
            return
        metrics.set_backend_state("nvml", False)
        try:
            await self._call(self.n.nvmlShutdown)
        except self.n.NVMLError as e:
            log.warning("nvmlShutdown failed: %s", e)
        self._pool.shutdown(wait=False)
        self._pool = None

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._pool is None:
            raise RuntimeError("NvmlBackend used outside 'async with'")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- discovery -----------------------------------------------------------------------

    async def discover(self) -> Sequence[DeviceInfo]:
        """Every GPU and MIG device, with NUMA nodes from sysfs; topology cached on the way."""
        try:
            raw, links, pcie = await self._call(self._discover_sync)
        except self.n.NVMLError as e:
            metrics.observe_nvml_error("discover")
            raise BackendUnavailable(f"NVML discovery failed: {e}") from None
        infos = []
        for info in raw:
            numa = await self._numa_node(info.pci_bus_id)
            pci_class = await self._pci_class(info.pci_bus_id)
            root = await asyncio.to_thread(self._pcie_root, info.pci_bus_id)
            infos.append(
                dataclasses.replace(info, numa_node=numa, pci_class=pci_class, pcie_root=root)
            )
        self._infos = tuple(infos)
        self._topology = topology.build(
            [(g.uuid, g.index, g.numa_node) for g in self._infos], nvlinks=links, pcie=pcie
        )
        return self._infos

    async def topology(self) -> topology.Topology:
        return self._topology

    async def _numa_node(self, bus_id: str) -> int | None:
        if not bus_id:
            return None
        path = self.sys_root / "bus/pci/devices" / sysfs_bdf(bus_id) / "numa_node"
        try:
            async with aiofiles.open(path) as f:
                value = int((await f.read()).strip())
        except (OSError, ValueError):
            return None
        return value if value >= 0 else None

    async def _pci_class(self, bus_id: str) -> int | None:
        """The GPU's PCI class from sysfs (`0x030200`: a 3D controller); None if unknown."""
        if not bus_id:
            return None
        path = self.sys_root / "bus/pci/devices" / sysfs_bdf(bus_id) / "class"
        try:
            async with aiofiles.open(path) as f:
                return int((await f.read()).strip(), 16)
        except (OSError, ValueError):
            return None

    def _pcie_root(self, bus_id: str) -> str:
        """The root complex in the device's sysfs path (`.../devices/pci0000:17/...`); blocking."""
        if not bus_id:
            return ""
        try:
            real = os.path.realpath(self.sys_root / "bus/pci/devices" / sysfs_bdf(bus_id))
        except OSError:
            return ""
        return next((p for p in Path(real).parts if _PCIE_ROOT.fullmatch(p)), "")

    def _fabric(self, h: Any) -> str:
        """`<cluster UUID>.<clique ID>` of a GPU whose fabric registration completed (what
        GFD labels `nvidia.com/gpu.clique`); empty when not fabric-attached or unknown."""
        n = self.n
        try:
            info = n.nvmlDeviceGetGpuFabricInfo(h)
            if int(info.state) != FABRIC_STATE_COMPLETED or int(info.status) != 0:
                return ""
            cluster = uuid_module.UUID(bytes=bytes(bytearray(info.clusterUuid)[:16]))
        except (n.NVMLError, AttributeError, TypeError, ValueError):
            return ""
        if cluster.int == 0:
            return ""
        return f"{cluster}.{int(info.cliqueId)}"

    def _mig_capable(self, h: Any) -> bool:
        try:
            self.n.nvmlDeviceGetMigMode(h)
        except self.n.NVMLError:
            return False  # NOT_SUPPORTED: no MIG on this GPU
        return True

    def _identity(self, h: Any) -> _Identity:
        """Brand, architecture, compute capability and driver versions (what DRA publishes);
        one the driver cannot answer is left out, never an error."""
        n = self.n
        out: dict[str, str] = {}

        def named(prefix: str, value: int) -> str:
            names = [k for k in dir(n) if k.startswith(prefix) and getattr(n, k) == value]
            word = min(names, key=len)[len(prefix) :] if names else ""
            return "" if word in ("", "UNKNOWN", "COUNT") else word.replace("_", " ").title()

        reads: dict[str, Callable[[], str]] = {
            "brand": lambda: named("NVML_BRAND_", int(n.nvmlDeviceGetBrand(h))),
            "architecture": lambda: named("NVML_DEVICE_ARCH_", int(n.nvmlDeviceGetArchitecture(h))),
            "cuda_compute_capability": lambda: "{}.{}".format(
                *n.nvmlDeviceGetCudaComputeCapability(h)
            ),
            "driver_version": lambda: _str(n.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": lambda: _cuda_version(int(n.nvmlSystemGetCudaDriverVersion())),
        }
        for key, read in reads.items():
            try:
                out[key] = read()
            except (n.NVMLError, AttributeError, TypeError, ValueError):
                continue  # an older driver or binding: the attribute is not published
        return cast(_Identity, out)

    def _discover_sync(
        self,
    ) -> tuple[list[DeviceInfo], dict[frozenset[str], int], dict[frozenset[str], str]]:
        n = self.n
        handles = []
        infos = []
        for index in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(index)
            uuid = _str(n.nvmlDeviceGetUUID(h))
            minor = int(n.nvmlDeviceGetMinorNumber(h))
            bus_id = _str(n.nvmlDeviceGetPciInfo(h).busId)
            migs = self._mig_devices(h, minor)
            infos.append(
                DeviceInfo(
                    uuid=uuid,
                    index=index,
                    minor=minor,
                    name=_str(n.nvmlDeviceGetName(h)),
                    memory_mib=int(n.nvmlDeviceGetMemoryInfo(h).total) // (1 << 20),
                    pci_bus_id=bus_id,
                    paths=(f"/dev/nvidia{minor}",),
                    mig_enabled=migs is not None,
                    mig_devices=tuple(migs or ()),
                    mig_capable=self._mig_capable(h),
                    fabric=self._fabric(h),
                    **self._identity(h),
                )
            )
            handles.append((uuid, h, bus_id))
        links: dict[frozenset[str], int] = {}
        pcie: dict[frozenset[str], str] = {}
        by_bus = {sysfs_bdf(b): u for u, _, b in handles}
        for uuid, h, _ in handles:
            for peer, count in self._nvlinks(h, by_bus).items():
                if peer != uuid:
                    pair = frozenset((uuid, peer))
                    links[pair] = max(links.get(pair, 0), count)
        for i, (a, ha, _) in enumerate(handles):
            for b, hb, _ in handles[i + 1 :]:
                try:
                    level = int(n.nvmlDeviceGetTopologyCommonAncestor(ha, hb))
                except n.NVMLError:
                    continue
                relation = PCIE_RELATION.get(level)
                if relation is not None:
                    pcie[frozenset((a, b))] = relation
        return infos, links, pcie

    def _active_links(self, h: Any) -> list[int]:
        """The GPU's NVLinks that are up: discovery counts them per peer, the metrics sum
        their error counters. Stops at "not supported" (no NVLink) or "invalid argument"
        (past the last link); a link that fails otherwise is left out."""
        n = self.n
        out = []
        for link in range(int(getattr(n, "NVML_NVLINK_MAX_LINKS", MAX_NVLINKS))):
            try:
                if n.nvmlDeviceGetNvLinkState(h, link) == FEATURE_ENABLED:
                    out.append(link)
            except n.NVMLError as e:
                if e.value in (NOT_SUPPORTED, 2):  # no NVLink / no more links
                    break
        return out

    def _nvlinks(self, h: Any, by_bus: Mapping[str, str]) -> dict[str, int]:
        """Active NVLinks of one GPU, counted per peer GPU (by the remote PCI bus id)."""
        n = self.n
        out: dict[str, int] = {}
        for link in self._active_links(h):
            try:
                remote = sysfs_bdf(_str(n.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId))
            except n.NVMLError:
                continue
            peer = by_bus.get(remote)
            if peer is not None:
                out[peer] = out.get(peer, 0) + 1
        return out

    def _mig_devices(self, h: Any, minor: int) -> list[MigInfo] | None:
        """MIG devices of a GPU in MIG mode, or None when MIG is off or unsupported."""
        n = self.n
        try:
            current, _pending = n.nvmlDeviceGetMigMode(h)
        except n.NVMLError:
            return None
        if current != n.NVML_DEVICE_MIG_ENABLE:
            return None
        migs: list[MigInfo] = []
        for slot in range(int(n.nvmlDeviceGetMaxMigDeviceCount(h))):
            try:
                m = n.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
            except n.NVMLError as e:
                if e.value == NOT_FOUND:
                    continue
                raise
            gi = int(n.nvmlDeviceGetGpuInstanceId(m))
            ci = int(n.nvmlDeviceGetComputeInstanceId(m))
            attrs = n.nvmlDeviceGetAttributes(m)
            profile = mig_profile(
                int(attrs.gpuInstanceSliceCount),
                int(attrs.computeInstanceSliceCount),
                int(attrs.memorySizeMB),
            )
            migs.append(
                MigInfo(
                    uuid=_str(n.nvmlDeviceGetUUID(m)),
                    profile=profile,
                    gi=gi,
                    ci=ci,
                    index=len(migs),
                    paths=self._mig_caps(minor, gi, ci),
                    memory_mb=int(attrs.memorySizeMB),
                    multiprocessors=int(getattr(attrs, "multiprocessorCount", 0)),
                    gi_slices=int(attrs.gpuInstanceSliceCount),
                    ci_slices=int(attrs.computeInstanceSliceCount),
                    placement=self._placement(h, gi),
                    engines=(
                        int(getattr(attrs, "sharedCopyEngineCount", 0)),
                        int(getattr(attrs, "sharedDecoderCount", 0)),
                        int(getattr(attrs, "sharedEncoderCount", 0)),
                        int(getattr(attrs, "sharedJpegCount", 0)),
                        int(getattr(attrs, "sharedOfaCount", 0)),
                    ),
                )
            )
        return migs

    def _placement(self, h: Any, gi: int) -> tuple[int, int]:
        """A GPU instance's memory-slice placement (start, size); (0, 0) when unknown."""
        n = self.n
        try:
            info = n.nvmlGpuInstanceGetInfo(n.nvmlDeviceGetGpuInstanceById(h, gi))
            return int(info.placement.start), int(info.placement.size)
        except (n.NVMLError, AttributeError, TypeError, ValueError):
            return 0, 0

    def _mig_caps(self, minor: int, gi: int, ci: int) -> tuple[str, ...]:
        """The two capability nodes of a MIG device, from the driver's capability files."""
        base = self.proc_root / f"driver/nvidia/capabilities/gpu{minor}/mig"
        paths = []
        for access in (base / f"gi{gi}/access", base / f"gi{gi}/ci{ci}/access"):
            try:
                text = access.read_text()
            except OSError:
                return ()
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "DeviceFileMinor":
                    paths.append(f"/dev/nvidia-caps/nvidia-cap{int(value)}")
        return tuple(paths)

    # -- compute mode (MPS) --------------------------------------------------------------

    async def set_compute_mode(self, uuids: Collection[str], exclusive: bool) -> None:
        """EXCLUSIVE_PROCESS or DEFAULT on each GPU (what an MPS daemon needs, as NVIDIA's
        mps-control-daemon sets with nvidia-smi -c); BackendError naming the GPU if not."""
        mode = COMPUTE_EXCLUSIVE_PROCESS if exclusive else COMPUTE_DEFAULT
        try:
            await self._call(self._set_modes, sorted(uuids), mode)
        except self.n.NVMLError as e:
            metrics.observe_nvml_error("nvmlDeviceSetComputeMode")
            raise BackendError(f"cannot set the compute mode: {e}") from None

    def _set_modes(self, uuids: list[str], mode: int) -> None:
        for uuid in uuids:
            h = self.n.nvmlDeviceGetHandleByUUID(uuid)
            if int(self.n.nvmlDeviceGetComputeMode(h)) != mode:
                self.n.nvmlDeviceSetComputeMode(h, mode)

    # -- metrics -------------------------------------------------------------------------

    async def read_metrics(self) -> Mapping[str, GpuMetrics]:
        """Every GPU's counters, read in the NVML thread; unsupported ones are None."""
        return dict(await self._call(self._counters.read_all, self._infos))

    # -- health --------------------------------------------------------------------------

    async def probe_health(self, ids: Collection[str]) -> Mapping[str, Probe]:
        """Each GPU must answer, with no pending page retirement or failed row remapping."""
        return dict(await self._call(self._probe_sync, sorted(ids)))

    def _probe_sync(self, ids: list[str]) -> dict[str, Probe]:
        n = self.n
        if self._broken is not None:
            try:
                n.nvmlInit()
            except n.NVMLError as e:
                return {u: self._nvml_failed(e) for u in ids}
            log.info("NVML answers again after: %s", self._broken)
            metrics.set_backend_state("nvml", True)
            self._broken = None
        out = {}
        for uuid in ids:
            try:
                out[uuid] = self._probe_one(uuid)
            except n.NVMLError as e:
                metrics.observe_nvml_error("probe")
                if e.value in NVML_GONE:
                    return {u: self._nvml_failed(e) for u in ids}
                reason = LOST if e.value in GPU_GONE else f"NVML error: {e}"
                out[uuid] = Probe(Health.UNHEALTHY, reason)
        return out

    def _nvml_failed(self, e: Exception) -> Probe:
        if self._broken is None:
            log.error("NVML failed as a whole: %s", e)
            metrics.set_backend_state("nvml", False)
        self._broken = str(e)
        return Probe(Health.UNHEALTHY, f"NVML failure: {e}", recovers_at_once=True)

    def _probe_one(self, uuid: str) -> Probe:
        n = self.n
        h = n.nvmlDeviceGetHandleByUUID(uuid)
        n.nvmlDeviceGetPciInfo(h)  # a lost GPU or one that needs a reset fails here
        try:
            if n.nvmlDeviceGetRetiredPagesPendingStatus(h) == n.NVML_FEATURE_ENABLED:
                return Probe(Health.UNHEALTHY, "retired pages pending (reset required)")
        except n.NVMLError as e:
            if e.value != NOT_SUPPORTED:
                raise
        try:
            _corr, _unc, pending, failure = n.nvmlDeviceGetRemappedRows(h)
        except n.NVMLError as e:
            if e.value != NOT_SUPPORTED:
                raise
        else:
            if failure:
                return Probe(Health.UNHEALTHY, "row remapping failed")
            if pending:
                return Probe(Health.UNHEALTHY, "row remapping pending (reset required)")
        return Probe(Health.HEALTHY)

    async def health_events(self) -> AsyncGenerator[HealthEvent, None]:
        """XID events as the event thread sees them, every one (the policy is health's)."""
        queue: asyncio.Queue[HealthEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def report(event: HealthEvent) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: we are shutting down
                loop.call_soon_threadsafe(queue.put_nowait, event)

        self._stop_events.clear()
        self._event_thread = threading.Thread(
            target=self._event_thread_main, args=(report,), name="nvml-events", daemon=True
        )
        self._event_thread.start()
        try:
            while True:
                yield await queue.get()
        finally:
            await self._stop_event_thread()

    async def _stop_event_thread(self) -> None:
        thread, self._event_thread = self._event_thread, None
        if thread is None:
            return
        self._stop_events.set()
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 5)

    def _event_thread_main(self, report: Any) -> None:
        n = self.n
        while not self._stop_events.is_set():
            try:
                event_set = n.nvmlEventSetCreate()
            except n.NVMLError as e:
                report(HealthEvent("", f"NVML event set failed: {e}", recovers_at_once=True))
                self._stop_events.wait(1.0)
                continue
            try:
                self._register_events(event_set, report)
                self._wait_events(event_set, report)
            finally:
                try:
                    n.nvmlEventSetFree(event_set)
                except n.NVMLError as e:
                    log.debug("nvmlEventSetFree: %s", e)
            self._stop_events.wait(1.0)

    def _register_events(self, event_set: Any, report: Any) -> None:
        n = self.n
        for info in self._infos:
            try:
                h = n.nvmlDeviceGetHandleByUUID(info.uuid)
                mask = int(n.nvmlDeviceGetSupportedEventTypes(h)) & n.nvmlEventTypeXidCriticalError
                if not mask:
                    log.warning("GPU %s reports no XID events; probes only", info.uuid)
                    continue
                n.nvmlDeviceRegisterEvents(h, mask, event_set)
            except n.NVMLError as e:
                if e.value == NOT_SUPPORTED:
                    log.warning("GPU %s cannot report XID events (%s); probes only", info.uuid, e)
                    continue
                report(HealthEvent(info.uuid, f"cannot watch XID events: {e}"))

    def _wait_events(self, event_set: Any, report: Any) -> None:
        n = self.n
        while not self._stop_events.is_set():
            try:
                data = n.nvmlEventSetWait_v2(event_set, EVENT_WAIT_MS)
            except n.NVMLError as e:
                if e.value == TIMEOUT:
                    continue
                metrics.observe_nvml_error("nvmlEventSetWait_v2")
                report(HealthEvent("", f"NVML event wait failed: {e}", recovers_at_once=True))
                return
            if not int(data.eventType) & n.nvmlEventTypeXidCriticalError:
                continue
            xid = int(data.eventData)
            try:
                uuid = _str(n.nvmlDeviceGetUUID(data.device))
            except n.NVMLError:
                uuid = ""  # no idea which GPU: all of them (NVIDIA does the same)
            gi, ci = int(data.gpuInstanceId), int(data.computeInstanceId)
            if uuid and gi != NO_INSTANCE and ci != NO_INSTANCE:
                uuid = self._mig_uuid(uuid, gi, ci) or uuid
            report(HealthEvent(uuid, f"XID {xid}", xid=xid))

    def _mig_uuid(self, parent: str, gi: int, ci: int) -> str | None:
        for info in self._infos:
            if info.uuid == parent:
                for m in info.mig_devices:
                    if (m.gi, m.ci) == (gi, ci):
                        return m.uuid
        return None


if TYPE_CHECKING:
    from aiodp.gpus.backend import DeviceBackend

    _: type[DeviceBackend] = NvmlBackend
