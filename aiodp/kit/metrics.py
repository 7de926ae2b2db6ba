"""What an operator can alert on: aiodp's Prometheus metrics, in one registry of our own.

The only importer of `prometheus_client`; other modules call the small `observe_*` and
`set_*` functions. Device gauges are read from a source callable at scrape time, so they
can never disagree with the registry.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final

import grpclib
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

import aiodp

REGISTRY: Final = CollectorRegistry(auto_describe=True)
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip

DeviceRow = tuple[str, str, str, str]
"""(resource, device ID, health, reason) of one advertised device."""

_device_source: Callable[[], Iterable[DeviceRow]] | None = None


class _BuildInfo(Collector):
    """`aiodp_build_info`, its labels worked out at the first scrape: nvidia-ml-py has no
    `__version__`, and `importlib.metadata` (which reads it) is not worth loading at start."""

    NAME: Final = "aiodp_build_info"
    HELP: Final = "Always 1; the labels say which versions run."
    LABELS: Final = ("version", "python", "grpclib", "nvml")

    def __init__(self) -> None:
        self._family: GaugeMetricFamily | None = None

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)

    def collect(self) -> Iterator[Metric]:
        if self._family is None:
            from importlib import metadata  # lazy: ~2 ms and, with betterproto2 fixed, 1 MiB

            try:
                nvml = metadata.version("nvidia-ml-py")
            except metadata.PackageNotFoundError:
                nvml = "unknown"
            python = ".".join(map(str, sys.version_info[:3]))
            family = GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)
            family.add_metric([aiodp.__version__, python, grpclib.__version__, nvml], 1)
            self._family = family
        yield self._family


REGISTRY.register(_BuildInfo())

HEALTH_TRANSITIONS: Final = Counter(
    "aiodp_health_transitions_total",
    "Device health changes, by resource, direction (to_unhealthy, to_healthy) and reason.",
    ["resource", "direction", "reason"],
    registry=REGISTRY,
)
XID_EVENTS: Final = Counter(
    "aiodp_xid_events_total",
    "XID events seen, by XID and whether the health policy acted on them.",
    ["xid", "action"],
    registry=REGISTRY,
)
REGISTRATIONS: Final = Counter(
    "aiodp_registrations_total",
    "Register calls to the kubelet, by resource and result (success, failure).",
    ["resource", "result"],
    registry=REGISTRY,
)
KUBELET_RESTARTS: Final = Counter(
    "aiodp_kubelet_restarts_total",
    "Kubelet restarts detected (kubelet.sock re-created or our socket removed).",
    registry=REGISTRY,
)
STREAMS_OPEN: Final = Gauge(
    "aiodp_listandwatch_streams",
    "ListAndWatch streams open now, by resource.",
    ["resource"],
    registry=REGISTRY,
)
SNAPSHOTS: Final = Counter(
    "aiodp_listandwatch_snapshots_total",
    "Device lists sent on ListAndWatch streams, by resource.",
    ["resource"],
    registry=REGISTRY,
)
REQUESTS: Final = Counter(
    "aiodp_requests_total",
    "Allocate and GetPreferredAllocation calls, by method, resource and gRPC status.",
    ["method", "resource", "code"],
    registry=REGISTRY,
)
LATENCY: Final = Histogram(
    "aiodp_request_duration_seconds",
    "Time to answer Allocate and GetPreferredAllocation, by method and resource.",
    ["method", "resource"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
NVML_ERRORS: Final = Counter(
    "aiodp_nvml_errors_total",
    "NVML calls that failed, by function.",
    ["function"],
    registry=REGISTRY,
)
BACKEND_UP: Final = Gauge(
    "aiodp_backend_initialized",
    "1 while the device backend (nvml, simulated) is initialised, else 0.",
    ["backend"],
    registry=REGISTRY,
)
CONFIG_RELOADS: Final = Counter(
    "aiodp_config_reloads_total",
    "Config file reloads, by result (applied, rejected, unchanged).",
    ["result"],
    registry=REGISTRY,
)


class _Devices(Collector):
    """aiodp_devices{resource,health} and aiodp_device_healthy{resource,device,reason}."""

    def collect(self) -> Iterator[Metric]:
        rows = list(_device_source() if _device_source else ())
        counts = GaugeMetricFamily(
            "aiodp_devices", "Advertised devices by resource and health.",
            labels=["resource", "health"],
        )  # fmt: skip
        per = GaugeMetricFamily(
            "aiodp_device_healthy",
            "1 if the device is Healthy, 0 if not; `reason` says why it is Unhealthy.",
            labels=["resource", "device", "reason"],
        )
        totals: dict[tuple[str, str], int] = {}
        for resource in {r for r, *_ in rows}:
            for health in ("Healthy", "Unhealthy"):
                totals[(resource, health)] = 0
        for resource, device, health, reason in rows:
            totals[(resource, health)] += 1
            per.add_metric([resource, device, reason], 1 if health == "Healthy" else 0)
        for (resource, health), n in sorted(totals.items()):
            counts.add_metric([resource, health], n)
        yield counts
        yield per

    def describe(self) -> Iterator[Metric]:
        return iter(())


REGISTRY.register(_Devices())
ProcessCollector(registry=REGISTRY)  # process_open_fds, process_resident_memory_bytes, ...

GPU_LABELS: Final = (
    "gpu", "UUID", "modelName", "GPU_I_ID", "GPU_I_PROFILE", "pod", "namespace", "container",
    "claim_name", "claim_namespace",
)  # fmt: skip
"""As dcgm-exporter names them. A MIG device's series carry its parent's gpu, UUID and model
with its GPU instance and profile (empty for a whole GPU); pod, namespace and container are
empty for a free device."""
GpuRow = tuple[Mapping[str, str], Mapping[str, object]]
"""(labels: GPU_LABELS; a GPU's readings by GpuMetrics field name)."""
PodRow = tuple[str, str, str, str, bool]
"""(namespace, pod, container, resource, healthy) of one device a container holds."""
_pod_source: Callable[[], Iterable[PodRow]] | None = None
_gpu_source: Callable[[], Iterable[GpuRow]] | None = None

# field -> (family, help, kind); kinds: gauge, counter, or a labelled family for the rest
GPU_FAMILIES: Final[Mapping[str, tuple[str, str, str]]] = {
    "utilization_ratio": ("aiodp_gpu_utilization_ratio", "GPU busy time (0-1).", "gauge"),
    "memory_utilization_ratio": (
        "aiodp_gpu_memory_utilization_ratio", "Memory controller busy time (0-1).", "gauge"),
    "memory_used_bytes": ("aiodp_gpu_memory_used_bytes", "Framebuffer memory used.", "gauge"),
    "memory_total_bytes": ("aiodp_gpu_memory_total_bytes", "Framebuffer memory.", "gauge"),
    "power_watts": ("aiodp_gpu_power_watts", "Power draw.", "gauge"),
    "energy_joules": ("aiodp_gpu_energy_joules", "Energy used since the driver loaded.", "counter"),
    "temperature_celsius": ("aiodp_gpu_temperature_celsius", "GPU temperature.", "gauge"),
    "sm_clock_hertz": ("aiodp_gpu_sm_clock_hertz", "SM clock.", "gauge"),
    "memory_clock_hertz": ("aiodp_gpu_memory_clock_hertz", "Memory clock.", "gauge"),
    "retired_pages": ("aiodp_gpu_retired_pages", "Retired framebuffer pages.", "gauge"),
    "pcie_replays": ("aiodp_gpu_pcie_replays", "PCIe replays.", "counter"),
}  # fmt: skip


class _Gpus(Collector):
    """Per-GPU readings from the backend (absent where the device does not support one)."""

    def collect(self) -> Iterator[Metric]:
        rows = list(_gpu_source() if _gpu_source else ())
        labels = list(GPU_LABELS)
        for field, (name, doc, kind) in GPU_FAMILIES.items():
            family: GaugeMetricFamily | CounterMetricFamily = (
                CounterMetricFamily(name, doc, labels=labels)
                if kind == "counter"
                else GaugeMetricFamily(name, doc, labels=labels)
            )
            for ids, values in rows:
                value = values.get(field)
                if isinstance(value, int | float):
                    family.add_metric([ids[k] for k in labels], float(value))
            yield family
        events = GaugeMetricFamily(
            "aiodp_gpu_clock_event_active", "1 while this reason holds clocks down.",
            labels=[*labels, "reason"],
        )  # fmt: skip
        ecc = CounterMetricFamily(
            "aiodp_gpu_ecc_errors", "ECC errors since the driver loaded (volatile).",
            labels=[*labels, "type"],
        )  # fmt: skip
        rows_remapped = CounterMetricFamily(
            "aiodp_gpu_remapped_rows", "Rows remapped for memory errors.", labels=[*labels, "type"]
        )
        nvlink = CounterMetricFamily(
            "aiodp_gpu_nvlink_errors", "NVLink errors over all links.", labels=[*labels, "type"]
        )
        for ids, values in rows:
            base = [ids[k] for k in labels]
            active = values.get("clock_events")
            if isinstance(active, frozenset):
                for reason in CLOCK_EVENT_LABELS:
                    events.add_metric([*base, reason], 1.0 if reason in active else 0.0)
            for kind, field in (("corrected", "ecc_corrected"), ("uncorrected", "ecc_uncorrected")):
                if isinstance(values.get(field), float):
                    ecc.add_metric([*base, kind], values[field])  # type: ignore[arg-type]
            for kind, field in (
                ("corrected", "remapped_rows_corrected"),
                ("uncorrected", "remapped_rows_uncorrected"),
            ):
                if isinstance(values.get(field), float):
                    rows_remapped.add_metric([*base, kind], values[field])  # type: ignore[arg-type]
            errors = values.get("nvlink_errors")
            if isinstance(errors, Mapping):
                for kind, n in sorted(errors.items()):
                    nvlink.add_metric([*base, str(kind)], float(n))
        yield events
        yield ecc
        yield rows_remapped
        yield nvlink

    def describe(self) -> Iterator[Metric]:
        return iter(())


CLOCK_EVENT_LABELS: Final = (
    "gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
    "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown",
    "display_clocks_setting",
)  # fmt: skip
REGISTRY.register(_Gpus())


class _Pods(Collector):
    """Devices each container holds, and those of them that are Unhealthy."""

    def collect(self) -> Iterator[Metric]:
        labels = ["namespace", "pod", "container", "resource"]
        held = GaugeMetricFamily(
            "aiodp_pod_devices", "Devices allocated to a container (pod-resources API).",
            labels=labels,
        )  # fmt: skip
        sick = GaugeMetricFamily(
            "aiodp_pod_unhealthy_devices",
            "Devices allocated to a container that are Unhealthy now: a pod on a failed GPU.",
            labels=labels,
        )
        counts: dict[tuple[str, str, str, str], list[int]] = {}
        for namespace, pod, container, resource, healthy in _pod_source() if _pod_source else ():
            c = counts.setdefault((namespace, pod, container, resource), [0, 0])
            c[0] += 1
            c[1] += 0 if healthy else 1
        for key, (n, bad) in sorted(counts.items()):
            held.add_metric(list(key), n)
            sick.add_metric(list(key), bad)
        yield held
        yield sick

    def describe(self) -> Iterator[Metric]:
        return iter(())


REGISTRY.register(_Pods())


def set_pod_source(source: Callable[[], Iterable[PodRow]] | None) -> None:
    """Where the per-container device counts come from (pod attribution of the plugin)."""
    global _pod_source
    _pod_source = source


def set_gpu_source(source: Callable[[], Iterable[GpuRow]] | None) -> None:
    """Where the per-GPU readings come from (the latest reading of the running plugin)."""
    global _gpu_source
    _gpu_source = source


_task_source: Callable[[], int] | None = None


class _Tasks(Collector):
    """aiodp_asyncio_tasks: tasks alive in the plugin's loop (flat in a healthy plugin)."""

    def collect(self) -> Iterator[Metric]:
        if _task_source is not None:
            yield GaugeMetricFamily(
                "aiodp_asyncio_tasks", "asyncio tasks alive in the event loop.", _task_source()
            )

    def describe(self) -> Iterator[Metric]:
        return iter(())


REGISTRY.register(_Tasks())


def set_task_source(source: Callable[[], int] | None) -> None:
    """How many tasks are alive (the running loop's count)."""
    global _task_source
    _task_source = source


def set_device_source(source: Callable[[], Iterable[DeviceRow]] | None) -> None:
    """Where the device gauges come from (the running plugin's registry)."""
    global _device_source
    _device_source = source


def reason_class(reason: str) -> str:
    """A bounded label for a reason: `XID 79`, `GPU is lost`, `NVML failure`, ..."""
    head = reason.split(":", 1)[0].strip()
    head = re.sub(r"\s*\(.*\)$", "", head)
    return head[:40] or "unknown"


def observe_transition(resource: str, healthy: bool, reason: str) -> None:
    direction = "to_healthy" if healthy else "to_unhealthy"
    HEALTH_TRANSITIONS.labels(resource, direction, reason_class(reason)).inc()


def observe_xid(xid: int | None, acted: bool) -> None:
    XID_EVENTS.labels(
        "none" if xid is None else str(xid), "marked_unhealthy" if acted else "ignored"
    ).inc()


def observe_registration(resource: str, ok: bool) -> None:
    REGISTRATIONS.labels(resource, "success" if ok else "failure").inc()


def observe_kubelet_restart() -> None:
    KUBELET_RESTARTS.inc()


def stream_opened(resource: str) -> None:
    STREAMS_OPEN.labels(resource).inc()


def stream_closed(resource: str) -> None:
    STREAMS_OPEN.labels(resource).dec()


def observe_snapshot(resource: str) -> None:
    SNAPSHOTS.labels(resource).inc()


@functools.lru_cache(maxsize=256)
def _request_children(method: str, resource: str, code: str) -> tuple[Counter, Histogram]:
    """The two label children a call updates, looked up once (`labels()` takes a lock and
    builds a key per call); children are never removed here. Bounded: methods, resources
    and status codes are few."""
    return REQUESTS.labels(method, resource, code), LATENCY.labels(method, resource)


def observe_request(method: str, resource: str, code: str, seconds: float) -> None:
    count, latency = _request_children(method, resource, code)
    count.inc()
    latency.observe(seconds)


def observe_nvml_error(function: str) -> None:
    NVML_ERRORS.labels(function).inc()


def set_backend_state(backend: str, up: bool) -> None:
    BACKEND_UP.labels(backend).set(1 if up else 0)


def observe_config_reload(result: str) -> None:
    CONFIG_RELOADS.labels(result).inc()


def samples(text: str) -> dict[str, float]:
    """Exposition text -> {'name{label="v",...}': value}, with prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
