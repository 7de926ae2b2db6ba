"""What each GPU's counters read now: utilisation, memory, power, energy, clocks, ECC,
retired pages and remapped rows, PCIe replays and NVLink errors, through the pynvml module
`NvmlBackend` hands in (blocking calls, made in its NVML thread). A reading the device lacks
is None, said once per GPU and reading; a failed one is counted, never a health verdict.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from aiodp.gpus.backend import CLOCK_EVENTS, NVLINK_ERRORS, DeviceInfo, GpuMetrics
from aiodp.kit import metrics

log = logging.getLogger(__name__)

NOT_SUPPORTED: Final = 3
VOLATILE_ECC: Final = 0  # NVML_VOLATILE_ECC
MEMORY_ERROR_CORRECTED: Final = 0
MEMORY_ERROR_UNCORRECTED: Final = 1
RETIRED_SINGLE_BIT: Final = 0  # NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
RETIRED_DOUBLE_BIT: Final = 1  # NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
TEMPERATURE_GPU: Final = 0
CLOCK_SM: Final = 1
CLOCK_MEM: Final = 2
# One nvmlDeviceGetFieldValues call per GPU reads these (NVML_FI_DEV_*), in place of a call
# each and, for NVLink, one per link and counter (up to 72): the batch serves there.
FIELDS: Final[Mapping[str, int]] = {
    "ecc_corrected": 3,  # ECC_SBE_VOL_TOTAL
    "ecc_uncorrected": 4,  # ECC_DBE_VOL_TOTAL
    "energy_mj": 83,  # TOTAL_ENERGY_CONSUMPTION
    "pcie_replays": 94,  # PCIE_REPLAY_COUNTER
    "replay": 52,  # NVLINK_REPLAY_ERROR_COUNT_TOTAL
    "recovery": 59,  # NVLINK_RECOVERY_ERROR_COUNT_TOTAL
    "crc_flit": 38,  # NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL
    "crc_data": 45,  # NVLINK_CRC_DATA_ERROR_COUNT_TOTAL
}
_VALUE_FIELDS: Final = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal")
"""c_nvmlValue_t's member for each NVML_VALUE_TYPE_* (0 to 5)."""


class Counters:
    """The counter readings of one NVML session: `n` is the pynvml module (or a fake one),
    `active_links(handle)` the GPU's active NVLinks (discovery knows them too)."""

    def __init__(self, n: Any, active_links: Callable[[Any], list[int]]) -> None:
        self.n = n
        self._active_links = active_links
        self._unsupported: set[tuple[str, str]] = set()
        """(GPU, reading) pairs NVML said it does not support: logged once."""

    def read_all(self, infos: Sequence[DeviceInfo]) -> dict[str, GpuMetrics]:
        """Every GPU's counters (and each MIG device's memory); blocking: NVML's thread."""
        out = {}
        for info in infos:
            try:
                h = self.n.nvmlDeviceGetHandleByUUID(info.uuid)
            except self.n.NVMLError:
                metrics.observe_nvml_error("nvmlDeviceGetHandleByUUID")
                continue
            out[info.uuid] = self._gpu_metrics(info.uuid, h)
            for mig in info.mig_devices:  # NVML reads memory per MIG device, not the rest
                try:
                    mh = self.n.nvmlDeviceGetHandleByUUID(mig.uuid)
                except self.n.NVMLError:
                    metrics.observe_nvml_error("nvmlDeviceGetHandleByUUID")
                    continue
                mem = self._read(mig.uuid, "memory", "nvmlDeviceGetMemoryInfo", mh)
                out[mig.uuid] = GpuMetrics(
                    memory_used_bytes=None if mem is None else float(mem.used),
                    memory_total_bytes=None if mem is None else float(mem.total),
                )
        return out

    def _read(self, uuid: str, what: str, name: str, *args: Any) -> Any:
        """One NVML read: None when the device (or these bindings) lack it, logged once per
        GPU and reading; None and counted when it fails; never a health verdict."""
        fn = getattr(self.n, name, None)
        try:
            if fn is None:
                raise self.n.NVMLError(NOT_SUPPORTED)
            return fn(*args)
        except self.n.NVMLError as e:
            if e.value == NOT_SUPPORTED:
                self._not_supported(uuid, what)
            else:
                metrics.observe_nvml_error(name)
            return None

    def _not_supported(self, uuid: str, what: str) -> None:
        """A reading the device lacks: said once per device and reading, then left out."""
        if (uuid, what) not in self._unsupported:
            self._unsupported.add((uuid, what))
            log.info("GPU %s does not support %s: that metric is left out", uuid, what)

    def _fields(self, uuid: str, h: Any) -> dict[str, float | None] | None:
        """FIELDS in one call; None when the call itself is unavailable (older driver or
        bindings) or fails, and the caller reads them one by one."""
        fn = getattr(self.n, "nvmlDeviceGetFieldValues", None)
        if fn is None:
            return None
        try:
            values = fn(h, list(FIELDS.values()))
        except self.n.NVMLError as e:
            if e.value != NOT_SUPPORTED:
                metrics.observe_nvml_error("nvmlDeviceGetFieldValues")
            return None
        out: dict[str, float | None] = {}
        for name, v in zip(FIELDS, values, strict=True):
            if v.nvmlReturn == 0 and 0 <= v.valueType < len(_VALUE_FIELDS):
                out[name] = float(getattr(v.value, _VALUE_FIELDS[v.valueType]))
                continue
            out[name] = None
            if v.nvmlReturn == NOT_SUPPORTED:
                self._not_supported(uuid, name)
            else:
                metrics.observe_nvml_error(f"nvmlDeviceGetFieldValues:{name}")
        return out

    def _gpu_metrics(self, uuid: str, h: Any) -> GpuMetrics:
        read = functools.partial(self._read, uuid)
        util = read("utilization", "nvmlDeviceGetUtilizationRates", h)
        mem = read("memory", "nvmlDeviceGetMemoryInfo", h)
        power = read("power", "nvmlDeviceGetPowerUsage", h)
        events = read("clock events", "nvmlDeviceGetCurrentClocksEventReasons", h)
        fields = self._fields(uuid, h)
        if fields is not None:
            energy = fields["energy_mj"]
            ecc = [fields["ecc_corrected"], fields["ecc_uncorrected"]]
            replays = fields["pcie_replays"]
            counts = {k: fields[k] for k in NVLINK_ERRORS}
            nvlink: Mapping[str, float] | None = (
                None
                if all(v is None for v in counts.values())
                else {k: v or 0.0 for k, v in counts.items()}
            )
        else:
            energy = read("energy", "nvmlDeviceGetTotalEnergyConsumption", h)
            ecc = [
                read("ECC errors", "nvmlDeviceGetTotalEccErrors", h, kind, VOLATILE_ECC)
                for kind in (MEMORY_ERROR_CORRECTED, MEMORY_ERROR_UNCORRECTED)
            ]
            replays = read("PCIe replays", "nvmlDeviceGetPcieReplayCounter", h)
            nvlink = self._nvlink_errors(uuid, h)
        retired = [
            read("retired pages", "nvmlDeviceGetRetiredPages", h, cause)
            for cause in (RETIRED_SINGLE_BIT, RETIRED_DOUBLE_BIT)
        ]
        rows = read("row remapping", "nvmlDeviceGetRemappedRows", h)
        return GpuMetrics(
            utilization_ratio=None if util is None else util.gpu / 100,
            memory_utilization_ratio=None if util is None else util.memory / 100,
            memory_used_bytes=None if mem is None else float(mem.used),
            memory_total_bytes=None if mem is None else float(mem.total),
            power_watts=None if power is None else power / 1000,
            energy_joules=None if energy is None else energy / 1000,
            temperature_celsius=_num(
                read("temperature", "nvmlDeviceGetTemperature", h, TEMPERATURE_GPU)
            ),
            sm_clock_hertz=_mhz(read("SM clock", "nvmlDeviceGetClockInfo", h, CLOCK_SM)),
            memory_clock_hertz=_mhz(read("memory clock", "nvmlDeviceGetClockInfo", h, CLOCK_MEM)),
            clock_events=None
            if events is None
            else frozenset(
                name for bit, name in enumerate(CLOCK_EVENTS) if int(events) & (1 << bit)
            ),
            ecc_corrected=_num(ecc[0]),
            ecc_uncorrected=_num(ecc[1]),
            retired_pages=None if None in retired else float(sum(len(p) for p in retired)),
            remapped_rows_corrected=None if rows is None else float(rows[0]),
            remapped_rows_uncorrected=None if rows is None else float(rows[1]),
            pcie_replays=_num(replays),
            nvlink_errors=nvlink,
        )

    def _nvlink_errors(self, uuid: str, h: Any) -> Mapping[str, float] | None:
        """Each error counter summed over the GPU's active links; None without NVLink."""
        links = self._active_links(h)
        if not links:
            return None
        out = {}
        for counter, name in enumerate(NVLINK_ERRORS):
            total = 0.0
            for link in links:
                value = self._read(
                    uuid, "NVLink errors", "nvmlDeviceGetNvLinkErrorCounter", h, link, counter
                )
                total += float(value or 0)
            out[name] = total
        return out


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _mhz(value: Any) -> float | None:
    return None if value is None else float(value) * 1e6
