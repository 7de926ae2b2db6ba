"""What the running plugin knows about itself: one read-only record for probes, demo and tests.

The supervisors report what happens through the record's methods (the only writers); everyone
else reads: `/readyz` and `/healthz` ask `readiness()` and `liveness()`, the demo and the
tests wait on `wait_for(...)`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import aiodp
from aiodp.gpus.devices import DeviceRegistry
from aiodp.gpus.live import Holder, Live
from aiodp.kit import aio, metrics
from aiodp.kit.errors import brief
from aiodp.ops import probes

log = logging.getLogger(__name__)

KubeletId = tuple[int | None, int]
"""kubelet.sock's (inode, event count): another kubelet has another one."""


LIVE_METRICS: Final = (
    "utilization_ratio",
    "memory_used_bytes",
    "power_watts",
    "temperature_celsius",
)
"""The few live readings /status shows per device (of its physical GPU)."""


class PluginStreams(Protocol):
    """What the record reads of one resource's device-plugin service (the device plugin's
    `DevicePluginService`; the record never imports the device plugin)."""

    @property
    def resource(self) -> str: ...
    @property
    def open_streams(self) -> int: ...
    @property
    def kubelet_stream_open(self) -> bool: ...
    @property
    def kubelet_sent(self) -> frozenset[str]: ...


class Status:
    """The plugin's own state; written only through its methods, read by anyone."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        """Set once every advertised resource has registered (the first time)."""
        self._pulse = aio.Pulse()
        self._generation = 0
        self._registrations = 0
        self._reasons: list[str] = []
        self._phase = "starting"
        self._wanted: tuple[str, ...] = ()
        self._services: dict[str, PluginStreams] = {}
        self._registered: set[str] = set()
        self._registered_since: dict[str, float] = {}
        self._registry: DeviceRegistry | None = None
        self._started_at = time.time()
        self._eternal: list[asyncio.Task[Any]] = []
        self._endpoint: probes.Endpoint | None = None
        self._holder: Holder | None = None
        self._heartbeat: Callable[[], float | None] = lambda: None
        self._reloads: list[str] = []
        self._kubelet: KubeletId | None = None
        self._kubelet_since: float | None = None
        self._kubelet_restarts = 0
        self._applied = -1
        self._accepted_at: list[float] = []
        self._started: list[str] = []
        self._holders: Callable[[], Mapping[str, str]] = dict
        self._readings: Callable[[], Mapping[str, Mapping[str, object]]] = dict
        self._on_allocate: Callable[[], None] = lambda: None
        self._claims: Callable[[], Sequence[tuple[str, str, str]]] = list
        self._dra: str | None = None
        self._dra_registered = False
        self._dra_error = ""
        self._dra_published: frozenset[str] = frozenset()
        self.dra_binds = 0
        """How many times the DRA sockets were bound (again after one was deleted)."""

    # -- reading ----------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Plugin generations started, over all resources."""
        return self._generation

    @property
    def registrations(self) -> int:
        """Registrations the kubelet accepted, over all resources."""
        return self._registrations

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why each earlier generation ended, oldest first."""
        return tuple(self._reasons)

    @property
    def phase(self) -> str:
        """What the plugin is doing: "serving" once ready, else the step it waits on."""
        return "serving" if self.readiness() is None else self._phase

    @property
    def wanted(self) -> tuple[str, ...]:
        """The resources the current plan advertises."""
        return self._wanted

    @property
    def registered(self) -> bool:
        """Every advertised resource is registered with the kubelet, and so is the DRA
        driver where it runs."""
        dra_ok = self._dra is None or self._dra_registered
        anything = bool(self._wanted) or self._dra is not None
        return anything and dra_ok and set(self._wanted) <= self._registered

    @property
    def eternal(self) -> tuple[asyncio.Task[Any], ...]:
        """Tasks that must never end while the plugin runs, for /healthz."""
        return tuple(self._eternal)

    @property
    def endpoint(self) -> probes.Endpoint | None:
        """Where /metrics, /healthz and /readyz are served, once bound."""
        return self._endpoint

    @property
    def live(self) -> Live | None:
        """What the plugin serves now (read from the one live holder)."""
        return self._holder.current() if self._holder is not None else None

    @property
    def accepted_at(self) -> tuple[float, ...]:
        """Wall-clock time of each accepted registration (for figures, not decisions)."""
        return tuple(self._accepted_at)

    @property
    def applied(self) -> int:
        """The live version whose resources the supervisor has put in place."""
        return self._applied

    @property
    def started(self) -> tuple[str, ...]:
        """Resources whose plugin task was started, in order (a rebuilt one appears again)."""
        return tuple(self._started)

    @property
    def reloads(self) -> tuple[str, ...]:
        """Config reload results (applied, rejected, unchanged), oldest first."""
        return tuple(self._reloads)

    def streams(self, resource: str) -> int:
        """ListAndWatch streams open for `resource` now (the kubelet's and others')."""
        service = self._services.get(resource)
        return service.open_streams if service is not None else 0

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds; re-checked whenever the record changes."""
        await self._pulse.wait_for(condition)

    def readiness(self) -> str | None:
        """None when every resource is registered and its ListAndWatch stream is open, and
        every CDI name we hand out is defined on the node."""
        if not self._wanted and self._dra is None:
            return self._phase
        if self._dra is not None and not self._dra_registered:
            why = f": {self._dra_error}" if self._dra_error else ""
            return f"DRA driver {self._dra}: not registered with the kubelet{why}"
        live = self.live
        if live is not None and live.cdi_missing:
            return f"CDI spec missing for {brief(live.cdi_missing)}"
        for name in self._wanted:
            if name not in self._registered:
                return f"{name}: not registered with the kubelet ({self._phase})"
            service = self._services.get(name)
            if service is None or not service.kubelet_stream_open:
                return f"{name}: registered, but no ListAndWatch stream is open"
        return None

    def liveness(self, now: float, health_interval: float, probing: bool) -> str | None:
        """None while every eternal task runs and health probes keep coming."""
        dead = [t.get_name() for t in self._eternal if t.done()]
        if dead:
            return f"task(s) ended: {', '.join(dead)}"
        last = self._heartbeat()
        if probing and last is not None and now - last > 3 * health_interval + 30:
            return f"no health probe for {now - last:.0f} s"
        return None

    # -- writing (the supervisors report here) ----------------------------------------------

    def changed(self) -> None:
        """Something a reader may re-check changed (e.g. a stream opened or ended)."""
        self._pulse.notify()

    def set_phase(self, phase: str) -> None:
        self._phase = phase
        self.changed()

    def eternal_task(self, task: asyncio.Task[Any]) -> None:
        self._eternal.append(task)

    def bound(self, endpoint: probes.Endpoint) -> None:
        self._endpoint = endpoint
        self.changed()

    def serving(
        self,
        holder: Holder,
        heartbeat: Callable[[], float | None],
        registry: DeviceRegistry | None = None,
    ) -> None:
        """The live holder and the registry to read, and when the last probe was applied."""
        self._holder, self._heartbeat, self._registry = holder, heartbeat, registry
        self.changed()

    def attributing(
        self,
        holders: Callable[[], Mapping[str, str]],
        on_allocate: Callable[[], None],
        claims: Callable[[], Sequence[tuple[str, str, str]]] = list,
    ) -> None:
        """Where `pod` of each device comes from (device ID -> `namespace/pod/container`),
        whom to tell when an Allocate is answered, and the DRA claims held by pods
        ((claim, pod, DRA device) triples)."""
        self._holders, self._on_allocate, self._claims = holders, on_allocate, claims

    def reading(self, latest: Callable[[], Mapping[str, Mapping[str, object]]]) -> None:
        """Where each GPU's latest counters come from (GPU UUID -> GpuMetrics fields)."""
        self._readings = latest

    def allocation_answered(self) -> None:
        self._on_allocate()

    def dra_serving(self, driver: str) -> None:
        """The DRA driver runs: readiness waits for the kubelet to register it too."""
        self._dra = driver
        self.changed()

    def held_by_either_api(self, gpus: frozenset[str]) -> frozenset[str]:
        """Which of `gpus` the kubelet's device-plugin streams or our ResourceSlices still
        show (what they last sent or published)."""
        sent: set[str] = set(self._dra_published)
        for service in self._services.values():
            sent |= service.kubelet_sent
        return gpus & sent

    async def wait_withdrawn(self, gpus: frozenset[str], within: float) -> None:
        """Until neither API shows `gpus` (bounded: a stalled stream or API server must not
        hold a reload for ever; after `within` seconds the move goes ahead, logged)."""
        try:
            async with asyncio.timeout(within):
                await self.wait_for(lambda: not self.held_by_either_api(gpus))
        except TimeoutError:
            log.warning("GPU(s) %s still shown after %.0f s; moving them anyway",
                        brief(sorted(self.held_by_either_api(gpus))), within)  # fmt: skip

    def dra_published(self, gpus: frozenset[str]) -> None:
        """The GPUs (parents of the devices) in the ResourceSlices just written."""
        self._dra_published = gpus
        self.changed()

    def dra_bound(self) -> None:
        self.dra_binds += 1
        self.changed()

    def dra_registered(self, registered: bool, error: str) -> None:
        """What the kubelet's plugin watcher said of our DRA driver."""
        self._dra_registered, self._dra_error = registered, error
        if self.registered:
            self.ready.set()
        self.changed()

    def snapshot(self) -> dict[str, Any]:
        """The node as the plugin sees it, for /status and `aiodp status` (JSON-ready)."""
        live = self.live
        out: dict[str, Any] = {
            "version": aiodp.__version__,
            "started": _iso(self._started_at),
            "phase": self.phase,
            "ready": self.readiness() or "ok",
            "kubelet": None
            if self._kubelet is None
            else {
                "socket": None if live is None else str(live.config.kubelet_socket),
                "inode": self._kubelet[0],
                "since": _iso(self._kubelet_since),
                "restarts_seen": self._kubelet_restarts,
            },
            "resources": [
                {
                    "name": name,
                    "registered": name in self._registered,
                    "since": _iso(self._registered_since.get(name)),
                    "streams": self.streams(name),
                }
                for name in self._wanted
            ],
            "dra": None
            if self._dra is None
            else {
                "driver": self._dra,
                "registered": self._dra_registered,
                "error": self._dra_error or None,
            },
            "devices": [],
            "claims": [
                {"claim": claim, "pod": pod, "device": device}
                for claim, pod, device in self._claims()
            ],
            "config": {},
            "reloads": {
                "count": len(self._reloads),
                "last": self._reloads[-1] if self._reloads else None,
            },
        }
        if live is not None:
            out["config"] = {
                key: {"value": _plain(getattr(live.config, key)), "source": source}
                for key, source in live.config.sources.items()
            }
        if live is not None and self._registry is not None:
            pods, readings = self._holders(), self._readings()
            out["devices"] = [
                {
                    "id": d.id,
                    "resource": d.resource,
                    "index": d.index,
                    "health": d.health.value,
                    "reason": d.reason,
                    "since": _iso(self._registry.since(d.id)),
                    "numa": d.numa_node,
                    "nvlink_peers": _peers(live, d.gpu),
                    "pod": pods.get(d.id),
                    "metrics": {
                        k: v
                        for k, v in readings.get(d.gpu, {}).items()
                        if k in LIVE_METRICS and isinstance(v, int | float)
                    },
                }
                for d in self._registry.inventory().devices
            ]
        return out

    def want(self, resources: Iterable[str]) -> None:
        self._wanted = tuple(sorted(resources))
        self.changed()

    def resource_started(self, resource: str) -> None:
        self._started.append(resource)
        self.changed()

    def applied_version(self, version: int) -> None:
        self._applied = version
        self.changed()

    def generation_started(self, service: PluginStreams) -> None:
        self._generation += 1
        self._services[service.resource] = service
        self.changed()

    def accepted(self, resource: str, kubelet: KubeletId) -> None:
        """The kubelet accepted `resource`'s registration; counts a kubelet restart."""
        if self._kubelet is not None and kubelet != self._kubelet:
            metrics.observe_kubelet_restart()  # kubelet.sock is another file than last time
            self._kubelet_restarts += 1
        if kubelet != self._kubelet:
            self._kubelet_since = time.time()
        self._kubelet = kubelet
        self._registrations += 1
        self._accepted_at.append(time.time())
        self._registered.add(resource)
        self._registered_since[resource] = time.time()
        if self.registered:
            self.ready.set()
        self.changed()

    def generation_ended(self, service: PluginStreams, reason: str) -> None:
        resource = service.resource
        self._registered.discard(resource)
        if resource in self._wanted:  # a resource a reload removed is not coming back
            self._phase = f"re-registering {resource}: {reason}"
        self._reasons.append(reason)
        log.info(
            "plugin generation %d of %s ends: %s",
            self._generation,
            resource,
            reason,
            extra={"generation": self._generation, "resource": resource},
        )
        self.changed()

    def generation_closed(self, service: PluginStreams) -> None:
        if self._services.get(service.resource) is service:
            del self._services[service.resource]
        self.changed()

    def reloaded(self, result: str) -> None:
        metrics.observe_config_reload(result)
        self._reloads.append(result)
        self.changed()


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")


def _plain(value: object) -> object:
    """A config value as JSON: paths as strings, tuples as lists, the rest as repr-able text."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _peers(live: Live, gpu: str) -> dict[str, int]:
    """NVLink peers of a GPU, by the other GPU's index: link counts from the topology."""
    out = {}
    for pair, score in live.topo.scores.items():
        if gpu in pair and score >= 100:
            (other,) = pair - {gpu}
            out[str(live.topo.order.get(other, other))] = score // 100
    return dict(sorted(out.items()))
