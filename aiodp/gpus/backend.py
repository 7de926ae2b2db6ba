"""What a device backend must provide, and the raw facts it reports."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, Self

from aiodp.gpus.devices import Health, imex_channel_path
from aiodp.gpus.topology import Topology
from aiodp.kit import metrics
from aiodp.kit.errors import BackendError

__all__ = [
    "CONTROL_PATHS",
    "NVLINK_ERRORS",
    "BackendError",
    "DeviceBackend",
    "DeviceInfo",
    "GpuMetrics",
    "HealthEvent",
    "MigInfo",
    "Probe",
    "control_paths",
    "imex_channels",
    "sysfs_bdf",
]

LOST: Final = "GPU is lost"
"""The reason of a GPU gone from the bus (NVML answers GPU_IS_LOST or NOT_FOUND for it)."""

CONTROL_PATHS: Final = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
"""The driver's shared control nodes a container may need, as NVIDIA's plugin lists them."""


def sysfs_bdf(bus_id: str) -> str:
    """NVML's `00000000:18:00.0` as sysfs spells it: `0000:18:00.0`."""
    domain, _, rest = bus_id.lower().partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest else bus_id.lower()


def imex_channels(dev_root: Path, wanted: Sequence[int]) -> tuple[int, ...]:
    """The wanted IMEX channels whose device nodes exist under `dev_root`; blocking."""
    return tuple(c for c in wanted if os.path.exists(dev_root / imex_channel_path(c).lstrip("/")))


def control_paths(dev_root: Path) -> tuple[str, ...]:
    """The control nodes that exist under `dev_root` (container paths); blocking: stats.

    Like NVIDIA's plugin, only nodes that exist are handed to the runtime: a DeviceSpec for a
    missing host path makes container creation fail.
    """
    return tuple(p for p in CONTROL_PATHS if os.path.exists(dev_root / p.lstrip("/")))


@dataclass(frozen=True, slots=True)
class MigInfo:
    """A MIG device on a GPU."""

    uuid: str
    profile: str
    """NVIDIA's profile name, e.g. `1g.10gb`."""
    gi: int
    ci: int
    index: int = 0
    """Position among the parent's MIG devices (the `N:index` index)."""
    paths: tuple[str, ...] = ()
    memory_mb: int = 0
    """NVML's MIG attributes (what GPU Feature Discovery labels): memory in MB, SMs, GPU and
    compute instance slices, and the shared engines; 0 where unknown."""
    multiprocessors: int = 0
    gi_slices: int = 0
    ci_slices: int = 0
    engines: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    """Shared (copy, decoder, encoder, jpeg, ofa) engines."""
    placement: tuple[int, int] = (0, 0)
    """The GPU instance's placement (first memory slice, slice count); size 0: unknown."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A physical GPU as discovered: identity, placement and device nodes."""

    uuid: str
    index: int
    minor: int
    name: str = ""
    memory_mib: int = 0
    numa_node: int | None = None
    pci_bus_id: str = ""
    paths: tuple[str, ...] = ()
    """Container paths of the GPU's own device nodes, e.g. `/dev/nvidia0`."""
    mig_enabled: bool = False
    mig_devices: tuple[MigInfo, ...] = ()
    health: Health = Health.HEALTHY
    reason: str = ""
    """A backend that knows health at discovery (the simulated file) says so here."""
    brand: str = ""
    """NVML's brand (`Nvidia`, `Tesla`, ...); empty when unknown. This and the next four
    are what DRA publishes about the GPU (ResourceSlice attributes)."""
    architecture: str = ""
    """`Hopper`, `Blackwell`, ...; empty when unknown."""
    cuda_compute_capability: str = ""
    """`9.0`; empty when unknown."""
    driver_version: str = ""
    cuda_driver_version: str = ""
    """The CUDA version the driver supports, `12.9`; empty when unknown."""
    mig_capable: bool = False
    """The GPU supports MIG (whether or not it is in MIG mode)."""
    pci_class: int | None = None
    """The PCI device class: 0x030200 a 3D controller (compute), 0x030000 VGA (graphics)."""
    fabric: str = ""
    """`<cluster UUID>.<clique ID>` of a fabric-attached GPU (NVLink domain); empty if none."""
    pcie_root: str = ""
    """The PCIe root complex the GPU hangs off (`pci0000:17`, from sysfs); empty if unknown:
    what DRA publishes as `resource.kubernetes.io/pcieRoot`, to align a GPU and a NIC."""


CLOCK_EVENTS: Final = metrics.CLOCK_EVENT_LABELS
"""Why clocks are held down (NVML's clock-event reasons, bit 0 upwards): a bounded label set."""
NVLINK_ERRORS: Final = ("replay", "recovery", "crc_flit", "crc_data")
"""NVLink data-link error counters (NVML_NVLINK_ERROR_DL_*, in that order)."""


@dataclass(frozen=True, slots=True)
class GpuMetrics:
    """One reading of a GPU's counters; None where the device does not support one."""

    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    power_watts: float | None = None
    energy_joules: float | None = None
    temperature_celsius: float | None = None
    sm_clock_hertz: float | None = None
    memory_clock_hertz: float | None = None
    clock_events: frozenset[str] | None = None
    ecc_corrected: float | None = None
    ecc_uncorrected: float | None = None
    retired_pages: float | None = None
    remapped_rows_corrected: float | None = None
    remapped_rows_uncorrected: float | None = None
    pcie_replays: float | None = None
    nvlink_errors: Mapping[str, float] | None = None
    """Per NVLink error counter (`crc_flit`, `crc_data`, `replay`, `recovery`), over all links."""


@dataclass(frozen=True, slots=True)
class Probe:
    """One health verdict about a GPU, with the reason when Unhealthy."""

    health: Health
    reason: str = ""
    recovers_at_once: bool = False
    """The fault is not the device's own (NVML failed, a simulated edit): it clears at the
    next passing probe instead of after the recovery period."""


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """An asynchronous fault report, such as an XID.

    `uuid` names a GPU (the fault fans out to its MIG devices and replicas), a MIG device
    (only that one), or is empty for every device (NVML itself failed). Every XID is
    reported; whether it acts is the health policy's business (`health.py`).
    """

    uuid: str
    reason: str
    xid: int | None = None
    recovers_at_once: bool = False


class DeviceBackend(Protocol):
    """A source of devices and their health: NVML on a node, a YAML file elsewhere."""

    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def discover(self) -> Sequence[DeviceInfo]: ...
    async def probe_health(self, ids: Collection[str]) -> Mapping[str, Probe]: ...
    def health_events(self) -> AsyncGenerator[HealthEvent, None]: ...
    async def topology(self) -> Topology: ...
    async def read_metrics(self) -> Mapping[str, GpuMetrics]:
        """A reading of every GPU's counters, by GPU UUID (off the loop)."""
        ...

    async def set_compute_mode(self, uuids: Collection[str], exclusive: bool) -> None:
        """EXCLUSIVE_PROCESS (for an MPS daemon) or DEFAULT on these GPUs; BackendError when
        the backend cannot (the simulated one has no GPUs to set)."""
        ...
