"""What an operator can alert on: aiodp's Prometheus metrics, in one registry of our own.

The only importer of `prometheus_client`; other modules call the small `observe_*` and
`set_*` functions. Device gauges are read from a source callable at scrape time, so they
can never disagree with the registry.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

REGISTRY: Final = CollectorRegistry(auto_describe=True)
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip

DeviceRow = tuple[str, str, str, str]
"""(resource, device ID, health, reason) of one advertised device."""

_device_source: Callable[[], Iterable[DeviceRow]] | None = None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO: Final = Gauge(
    "aiodp_build_info",
    "Always 1; the labels say which versions run.",
    ["version", "python", "grpclib", "nvml"],
    registry=REGISTRY,
)
BUILD_INFO.labels(
    _version("aiodp"),
    ".".join(map(str, sys.version_info[:3])),
    _version("grpclib"),
    _version("nvidia-ml-py"),
).set(1)

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


def observe_request(method: str, resource: str, code: str, seconds: float) -> None:
    REQUESTS.labels(method, resource, code).inc()
    LATENCY.labels(method, resource).observe(seconds)


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
