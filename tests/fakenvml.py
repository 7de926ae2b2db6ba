"""A fake of the part of pynvml that NvmlBackend uses, over a scriptable machine.

`FakeMachine` holds GPUs (with NVLinks, MIG devices, faults) and an XID event queue;
`machine.module()` returns an object with pynvml's names bound to it. Every call takes
the machine's lock, like the real library's internal serialisation.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NO_INSTANCE = 0xFFFFFFFF
XID_EVENT = 0x8

MESSAGES = {
    1: "Uninitialized",
    2: "Invalid Argument",
    3: "Not Supported",
    6: "Not Found",
    9: "Driver Not Loaded",
    10: "Timeout",
    12: "NVML Shared Library Not Found",
    15: "GPU is lost",
    999: "Unknown Error",
}


FIELD_IDS: dict[int, str | int] = {
    3: "ecc0", 4: "ecc1", 83: "energy", 94: "pcie", 52: 0, 59: 1, 38: 2, 45: 3
}  # fmt: skip
"""NVML_FI_DEV_* this fake answers: ECC volatile totals, energy, PCIe replays, and the
NVLink error totals (by NVML_NVLINK_ERROR_DL_* counter)."""


def _field(value: int, code: int = 0) -> Any:
    """One c_nvmlFieldValue_t: an unsigned long long (NVML_VALUE_TYPE_UNSIGNED_LONG_LONG)."""
    return SimpleNamespace(nvmlReturn=code, valueType=3, value=SimpleNamespace(ullVal=value))


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return MESSAGES.get(self.value, f"NVML error {self.value}")


@dataclass
class FakeMig:
    uuid: str
    gi: int
    ci: int
    gi_slices: int = 1
    ci_slices: int = 1
    memory_mb: int = 9856
    memory_used: int = 0
    multiprocessors: int = 16
    engines: tuple[int, int, int, int, int] = (1, 1, 0, 0, 0)
    """Shared (copy, decoder, encoder, jpeg, ofa) engines."""
    placement: tuple[int, int] = (0, 1)
    """(first memory slice, slices) of its GPU instance."""


@dataclass
class FakeGpu:
    uuid: str
    minor: int
    bus_id: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory: int = 85520809984
    numa: int = 0
    nvlinks: dict[int, int] = field(default_factory=dict)
    """peer GPU index -> number of links"""
    migs: list[FakeMig] | None = None
    compute_mode: int = 0
    """NVML_COMPUTEMODE_*: 0 default, 3 exclusive process."""
    mig_capable: bool = True
    """False: nvmlDeviceGetMigMode answers NOT_SUPPORTED (a GPU without MIG)."""
    fabric: tuple[bytes, int] | None = None
    """(cluster UUID bytes, clique ID) of a fabric-attached GPU; None: not attached."""
    lost: bool = False
    retired_pending: bool = False
    remap_failure: bool = False
    events_supported: bool = True
    # counters read for /metrics
    utilization: tuple[int, int] = (0, 0)
    """(GPU busy %, memory controller busy %)"""
    memory_used: int = 0
    power_mw: int = 70_000
    energy_mj: int = 0
    temperature: int = 35
    clocks_mhz: tuple[int, int] = (1980, 2619)
    """(SM, memory)"""
    clock_events: int = 0x1
    ecc: tuple[int, int] = (0, 0)
    """(corrected, uncorrected) volatile ECC errors"""
    retired: tuple[int, int] = (0, 0)
    """retired pages: (multiple single-bit, double-bit)"""
    remapped: tuple[int, int] = (0, 0)
    """remapped rows: (corrected, uncorrected)"""
    pcie_replays: int = 0
    nvlink_errors: dict[int, int] = field(default_factory=dict)
    """NVLink error counter -> count, on each active link"""


@dataclass
class Handle:
    gpu: int
    mig: int | None = None


class FakeMachine:
    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.lock = threading.Lock()
        self.initialised = False
        self.init_error: int | None = None
        self.broken: int | None = None
        """When set, every call after init fails with this code (the driver went away)."""
        self.wait_error: int | None = None
        self.events: queue.Queue[tuple[int, int, int, int]] = queue.Queue()
        self.calls: list[str] = []
        self.unsupported: set[str] = set()
        """Functions that answer NOT_SUPPORTED on every device (an older GPU or driver)."""
        self.unsupported_fields: set[int] = set()
        """Field IDs nvmlDeviceGetFieldValues answers NOT_SUPPORTED for, one by one."""
        self.failing: set[str] = set()
        """Functions that answer UNKNOWN: a reading the driver failed."""
        self._called = threading.Condition(self.lock)

    def wait_calls(self, name: str, count: int, timeout: float = 5) -> bool:
        """Block (in a thread) until `name` has been called `count` times."""
        with self._called:
            return self._called.wait_for(lambda: self.calls.count(name) >= count, timeout)

    # -- scripting --------------------------------------------------------------------
    def inject_xid(self, gpu: int, xid: int, gi: int = NO_INSTANCE, ci: int = NO_INSTANCE) -> None:
        self.events.put((gpu, xid, gi, ci))

    # -- the module -------------------------------------------------------------------
    def module(self) -> Any:
        m = SimpleNamespace(
            NVMLError=NVMLError,
            NVML_FEATURE_ENABLED=1,
            NVML_DEVICE_MIG_ENABLE=1,
            NVML_NVLINK_MAX_LINKS=36,
            nvmlEventTypeXidCriticalError=XID_EVENT,
        )
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(m, name, self._wrap(name, getattr(self, name)))
        return m

    def _wrap(self, name: str, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            with self.lock:
                self.calls.append(name)
                self._called.notify_all()
                if name != "nvmlInit" and not self.initialised:
                    raise NVMLError(NVML_ERROR_UNINITIALIZED)
                if self.broken is not None and name not in ("nvmlInit", "nvmlShutdown"):
                    raise NVMLError(self.broken)
                if name in self.unsupported:
                    raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
                if name in self.failing:
                    raise NVMLError(NVML_ERROR_UNKNOWN)
            return fn(*args)

        return call

    def _gpu(self, h: Handle) -> FakeGpu:
        gpu = self.gpus[h.gpu]
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return gpu

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        if self.broken is not None:
            raise NVMLError(self.broken)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.95.05"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    def nvmlDeviceGetBrand(self, h: Handle) -> int:
        return 14  # NVML_BRAND_NVIDIA

    def nvmlDeviceGetArchitecture(self, h: Handle) -> int:
        return 9  # NVML_DEVICE_ARCH_HOPPER

    def nvmlDeviceGetCudaComputeCapability(self, h: Handle) -> tuple[int, int]:
        return (9, 0)

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Handle:
        return Handle(i)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Handle:
        for i, g in enumerate(self.gpus):
            if g.uuid == uuid:
                if g.lost:
                    raise NVMLError(NVML_ERROR_GPU_IS_LOST)
                return Handle(i)
            for n, m in enumerate(g.migs or []):
                if m.uuid == uuid:
                    return Handle(i, n)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, h: Handle) -> str:
        gpu = self._gpu(h)
        if h.mig is not None:
            assert gpu.migs is not None
            return gpu.migs[h.mig].uuid
        return gpu.uuid

    def nvmlDeviceGetMinorNumber(self, h: Handle) -> int:
        return self._gpu(h).minor

    def nvmlDeviceGetName(self, h: Handle) -> bytes:
        return self._gpu(h).name.encode()  # old bindings answer bytes

    def nvmlDeviceGetMemoryInfo(self, h: Handle) -> Any:
        gpu = self._gpu(h)
        if h.mig is not None:
            mig = self._mig(h)
            return SimpleNamespace(total=mig.memory_mb * 2**20, used=mig.memory_used)
        return SimpleNamespace(total=gpu.memory, used=gpu.memory_used)

    # -- counters for /metrics (units as NVML answers them) ---------------------------
    def nvmlDeviceGetUtilizationRates(self, h: Handle) -> Any:
        gpu, mem = self._gpu(h).utilization
        return SimpleNamespace(gpu=gpu, memory=mem)

    def nvmlDeviceGetPowerUsage(self, h: Handle) -> int:
        return self._gpu(h).power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h: Handle) -> int:
        return self._gpu(h).energy_mj

    def nvmlDeviceGetTemperature(self, h: Handle, sensor: int) -> int:
        assert sensor == 0  # NVML_TEMPERATURE_GPU
        return self._gpu(h).temperature

    def nvmlDeviceGetClockInfo(self, h: Handle, clock: int) -> int:
        return self._gpu(h).clocks_mhz[{1: 0, 2: 1}[clock]]  # NVML_CLOCK_SM, NVML_CLOCK_MEM

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: Handle) -> int:
        return self._gpu(h).clock_events

    def nvmlDeviceGetTotalEccErrors(self, h: Handle, kind: int, counter: int) -> int:
        assert counter == 0  # NVML_VOLATILE_ECC
        return self._gpu(h).ecc[kind]

    def nvmlDeviceGetRetiredPages(self, h: Handle, cause: int) -> list[int]:
        return [0x1000 * i for i in range(self._gpu(h).retired[cause])]

    def nvmlDeviceGetPcieReplayCounter(self, h: Handle) -> int:
        return self._gpu(h).pcie_replays

    def nvmlDeviceGetFieldValues(self, h: Handle, ids: list[int]) -> list[Any]:
        gpu, out = self._gpu(h), []
        for fid in ids:
            what = FIELD_IDS.get(fid)
            nvlink = isinstance(what, int)
            if what is None or fid in self.unsupported_fields or (nvlink and not self._links(h)):
                out.append(_field(0, NVML_ERROR_NOT_SUPPORTED))
                continue
            if isinstance(what, int):  # an NVLink total over the active links
                value = gpu.nvlink_errors.get(what, 0) * len(self._links(h))
            else:
                value = {"ecc0": gpu.ecc[0], "ecc1": gpu.ecc[1], "energy": gpu.energy_mj,
                         "pcie": gpu.pcie_replays}[what]  # fmt: skip
            out.append(_field(value))
        return out

    def nvmlDeviceGetNvLinkErrorCounter(self, h: Handle, link: int, counter: int) -> int:
        if link >= len(self._links(h)):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self._gpu(h).nvlink_errors.get(counter, 0)

    def nvmlDeviceGetPciInfo(self, h: Handle) -> Any:
        return SimpleNamespace(busId=self._gpu(h).bus_id)

    def nvmlDeviceGetMigMode(self, h: Handle) -> list[int]:
        gpu = self._gpu(h)
        if not gpu.mig_capable:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [1, 1] if gpu.migs is not None else [0, 0]

    def nvmlDeviceGetGpuInstanceById(self, h: Handle, gi: int) -> tuple[int, int]:
        migs = self._gpu(h).migs or []
        if not any(m.gi == gi for m in migs):
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return (h.gpu, gi)

    def nvmlGpuInstanceGetInfo(self, gih: tuple[int, int]) -> Any:
        gpu, gi = gih
        m = next(m for m in self.gpus[gpu].migs or [] if m.gi == gi)
        start, size = m.placement
        return SimpleNamespace(placement=SimpleNamespace(start=start, size=size))

    def nvmlDeviceGetComputeMode(self, h: Handle) -> int:
        return self._gpu(h).compute_mode

    def nvmlDeviceSetComputeMode(self, h: Handle, mode: int) -> None:
        self._gpu(h).compute_mode = mode

    def nvmlDeviceGetGpuFabricInfo(self, h: Handle) -> Any:
        gpu = self._gpu(h)
        if gpu.fabric is None:
            return SimpleNamespace(clusterUuid=bytes(16), cliqueId=0, state=1, status=0)
        cluster, clique = gpu.fabric
        return SimpleNamespace(clusterUuid=cluster, cliqueId=clique, state=3, status=0)

    def nvmlDeviceGetMaxMigDeviceCount(self, h: Handle) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: Handle, i: int) -> Handle:
        migs = self._gpu(h).migs or []
        if i >= len(migs):
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return Handle(h.gpu, i)

    def _mig(self, h: Handle) -> FakeMig:
        migs = self._gpu(h).migs
        assert migs is not None
        assert h.mig is not None
        return migs[h.mig]

    def nvmlDeviceGetGpuInstanceId(self, h: Handle) -> int:
        return self._mig(h).gi

    def nvmlDeviceGetComputeInstanceId(self, h: Handle) -> int:
        return self._mig(h).ci

    def nvmlDeviceGetAttributes(self, h: Handle) -> Any:
        m = self._mig(h)
        copy, decoder, encoder, jpeg, ofa = m.engines
        return SimpleNamespace(
            gpuInstanceSliceCount=m.gi_slices,
            computeInstanceSliceCount=m.ci_slices,
            memorySizeMB=m.memory_mb,
            multiprocessorCount=m.multiprocessors,
            sharedCopyEngineCount=copy,
            sharedDecoderCount=decoder,
            sharedEncoderCount=encoder,
            sharedJpegCount=jpeg,
            sharedOfaCount=ofa,
        )

    def _links(self, h: Handle) -> list[int]:
        out = []
        for peer, count in sorted(self._gpu(h).nvlinks.items()):
            out += [peer] * count
        return out

    def nvmlDeviceGetNvLinkState(self, h: Handle, link: int) -> int:
        links = self._links(h)
        if not links:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if link >= 18:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return 1 if link < len(links) else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: Handle, link: int) -> Any:
        return SimpleNamespace(busId=self.gpus[self._links(h)[link]].bus_id.encode())

    def nvmlDeviceGetTopologyCommonAncestor(self, a: Handle, b: Handle) -> int:
        ga, gb = self._gpu(a), self._gpu(b)
        if ga.numa != gb.numa:
            return 50  # SYSTEM
        return 10 if abs(a.gpu - b.gpu) == 1 and min(a.gpu, b.gpu) % 2 == 0 else 30

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: Handle) -> int:
        return 1 if self._gpu(h).retired_pending else 0

    def nvmlDeviceGetRemappedRows(self, h: Handle) -> tuple[int, int, int, int]:
        gpu = self._gpu(h)
        return (*gpu.remapped, 0, 1 if gpu.remap_failure else 0)

    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlEventSetFree(self, event_set: object) -> None:
        return None

    def nvmlDeviceGetSupportedEventTypes(self, h: Handle) -> int:
        if not self._gpu(h).events_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return 0xFF9F

    def nvmlDeviceRegisterEvents(self, h: Handle, mask: int, event_set: object) -> None:
        self._gpu(h)

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> Any:
        if self.wait_error is not None:
            raise NVMLError(self.wait_error)
        try:  # a fake may answer TIMEOUT early: the backend's loop must cope
            gpu, xid, gi, ci = self.events.get(timeout=min(timeout_ms / 1000, 0.02))
        except queue.Empty:
            raise NVMLError(NVML_ERROR_TIMEOUT) from None
        return SimpleNamespace(
            device=Handle(gpu),
            eventType=XID_EVENT,
            eventData=xid,
            gpuInstanceId=gi,
            computeInstanceId=ci,
        )


def dgx(n: int = 8) -> FakeMachine:
    """A DGX-like box: n GPUs, two NUMA nodes, NVLink pairs (4 links) and quads (2 links)."""
    gpus = []
    for i in range(n):
        links = {j: 4 if j // 2 == i // 2 else 2 for j in range(n) if j != i and j // 4 == i // 4}
        gpus.append(
            FakeGpu(
                uuid=f"GPU-fake-{i:04d}",
                minor=i,
                bus_id=f"00000000:{0x18 + 0x10 * i:02X}:00.0",
                numa=i * 2 // n,
                nvlinks=links,
            )
        )
    return FakeMachine(gpus)


def with_mig(machine: FakeMachine, gpu: int) -> FakeMachine:
    """Put one GPU into MIG mode with two 1g.10gb devices and one 2g.20gb."""
    machine.gpus[gpu].migs = [
        FakeMig(f"MIG-fake-{gpu}-a", gi=7, ci=0),
        FakeMig(f"MIG-fake-{gpu}-b", gi=8, ci=0),
        FakeMig(f"MIG-fake-{gpu}-c", gi=3, ci=0, gi_slices=2, ci_slices=2, memory_mb=19968),
    ]
    return machine
