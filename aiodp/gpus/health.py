"""When devices turn Unhealthy or Healthy again: probes and events -> registry, logged once.

Health is a state, not a latch. Every device (by its GPU or MIG UUID; replicas share it)
has a track: a fault with its reason, since when probes have passed, and the last critical
event. A fault from the device itself (an XID, a lost GPU) clears once probes have passed
for `recovery_period` seconds with no new critical event (0: never, NVIDIA's behaviour);
a fault that was not the device's own (NVML failed, a simulated edit) clears at the next
passing probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from aiodp.config.model import HealthPolicy
from aiodp.gpus.backend import DeviceBackend, GpuMetrics, HealthEvent, Probe
from aiodp.gpus.devices import Device, DeviceRegistry, Health, Uuid
from aiodp.kit import metrics
from aiodp.kit.errors import cut_text

log = logging.getLogger(__name__)


@dataclass
class _Track:
    reason: str | None = None
    at_once: bool = False
    ok_since: float | None = None
    last_event: float | None = None

    def probe(self, p: Probe, now: float, period: float) -> None:
        if p.health is Health.UNHEALTHY:
            self.ok_since = None
            if p.recovers_at_once and self.reason is not None and not self.at_once:
                return  # the device's own fault outlives a passing failure of NVML
            self.reason, self.at_once = p.reason or "probe failed", p.recovers_at_once
            return
        if self.ok_since is None:
            self.ok_since = now
        if self.reason is None:
            return
        if self.at_once:
            self.reason = None
        elif period > 0:
            start = max(self.ok_since, self.last_event or self.ok_since)
            if now - start >= period:
                self.reason = None

    def event(self, reason: str, now: float, at_once: bool) -> None:
        if not at_once:
            self.reason, self.at_once, self.last_event = reason, False, now
        elif self.reason is None:
            self.reason, self.at_once = reason, True


class HealthTracker:
    """Turns probe results and events into registry health, one transition log each.

    Tracks are kept per GPU or MIG UUID (replicas share theirs); the registry fans each
    verdict out to the advertised devices. The health policy (which XIDs act) is applied
    here: backends report every event as it is.
    """

    def __init__(
        self,
        registry: DeviceRegistry,
        *,
        recovery_period: float,
        policy: HealthPolicy | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.registry = registry
        self.recovery_period = recovery_period
        self.policy = policy or HealthPolicy()
        self._clock = clock
        self._tracks: dict[Uuid, _Track] = {}
        self._holds: dict[Uuid, str] = {}
        """GPUs held Unhealthy by something beside the GPU itself (its MPS daemon down)."""
        self.last_probe: float | None = None
        """When the last round of probes was applied: the liveness probe's heartbeat."""

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    def _devices(self) -> tuple[Device, ...]:
        return self.registry.inventory().devices

    def _track(self, uuid: Uuid) -> _Track:
        return self._tracks.setdefault(uuid, _Track())

    def on_probes(self, probes: Mapping[str, Probe]) -> tuple[tuple[Device, Device], ...]:
        """Probe verdicts keyed by GPU (or MIG) UUID; a GPU's verdict covers its MIG devices."""
        now = self._now()
        self.last_probe = now
        gpu_of: dict[Uuid, Uuid] = {d.uuid: d.gpu for d in self._devices()}
        for uuid, gpu in sorted(gpu_of.items()):
            p = probes.get(uuid) or probes.get(gpu)
            if p is not None:
                self._track(uuid).probe(p, now, self.recovery_period)
        return self._apply()

    def on_event(self, event: HealthEvent) -> tuple[tuple[Device, Device], ...]:
        """A critical event marks its GPU (and all on it), its MIG device, or everything."""
        critical = event.xid is None or self.policy.xid_is_critical(event.xid)
        if event.xid is not None:
            metrics.observe_xid(event.xid, critical)
        if not critical:
            log.info(
                "ignoring %s on %s (health policy)",
                event.reason,
                event.uuid or "all GPUs",
                extra={"device": event.uuid, "xid": event.xid, "reason": event.reason},
            )
            return ()
        now = self._now()
        hit = {d.uuid for d in self._devices() if not event.uuid or event.uuid in (d.uuid, d.gpu)}
        if not hit:
            log.warning(
                "%s on unknown device %s",
                event.reason,
                event.uuid,
                extra={"device": event.uuid, "xid": event.xid},
            )
        for uuid in sorted(hit):
            self._track(uuid).event(event.reason, now, event.recovers_at_once)
        return self._apply()

    def hold(self, gpus: Collection[str], reason: str | None) -> tuple[tuple[Device, Device], ...]:
        """Hold these GPUs (and all on them) Unhealthy for `reason` until held again with
        None, whatever the probes say: a condition outside the GPU, such as its MPS daemon."""
        released = set()
        for uuid in gpus:
            if reason is None:
                if self._holds.pop(Uuid(uuid), None) is not None:
                    released.add(uuid)
            else:
                self._holds[Uuid(uuid)] = reason
        for d in self._devices():
            if d.gpu in released:
                self._track(d.uuid)  # a verdict again: Healthy unless its own track says no
        return self._apply()

    def reapply(self) -> tuple[tuple[Device, Device], ...]:
        """Apply the tracked verdicts again, e.g. after the device list was replaced."""
        return self._apply()

    def _apply(self) -> tuple[tuple[Device, Device], ...]:
        verdicts: dict[Uuid, tuple[Health, str]] = {}
        for uuid, gpu in {d.uuid: d.gpu for d in self._devices()}.items():  # replicas: once
            track = self._tracks.get(uuid)
            held = self._holds.get(gpu)
            if track is None and held is None:
                continue
            reason = track.reason if track is not None else None
            reason = reason or held
            verdicts[uuid] = (Health.HEALTHY, "") if reason is None else (Health.UNHEALTHY, reason)
        changes = self.registry.apply_health(verdicts)
        log_transitions(changes)
        return changes


def log_transitions(changes: Sequence[tuple[Device, Device]]) -> None:
    """One line per GPU or MIG device that changed (its replicas together): WARNING when it
    fails, INFO when it recovers. The metrics count every advertised device whose health
    changed; a new reason while still Unhealthy is one INFO line and no transition."""
    Key = tuple[str, str, Health, str, str]
    groups: dict[Key, list[Device]] = {}
    for old, new in changes:
        key: Key
        if old.health is new.health:
            if new.health is Health.UNHEALTHY and new.reason != old.reason:
                key = (new.uuid, new.resource, new.health, "", new.reason)  # "": no transition
                groups.setdefault(key, []).append(new)
            continue
        metrics.observe_transition(
            new.resource, new.health is Health.HEALTHY, new.reason or old.reason
        )
        key = (new.uuid, new.resource, new.health, old.health.value, new.reason or old.reason)
        groups.setdefault(key, []).append(new)
    for (uuid, resource, health, old_health, reason), devices in groups.items():
        what = devices[0].id if len(devices) == 1 else f"{uuid} ({len(devices)} replicas)"
        extra = {"resource": resource, "device": uuid, "reason": reason}
        if not old_health:
            log.info("device %s still Unhealthy, now: %s", what, reason, extra=extra)
        elif health is Health.UNHEALTHY:
            log.warning(
                "device %s health %s -> %s (%s)", what, old_health, health.value, reason,
                extra=extra,
            )  # fmt: skip
        else:
            log.info(
                "device %s health %s -> %s (was: %s)", what, old_health, health.value, reason,
                extra=extra,
            )  # fmt: skip


async def probe_once(backend: DeviceBackend, tracker: HealthTracker) -> None:
    """Probe every device's GPU once and apply the verdicts in one registry change."""
    gpus = sorted({d.gpu for d in tracker.registry.inventory().devices})
    tracker.on_probes(await backend.probe_health(gpus))


async def run_health(
    backend: DeviceBackend,
    tracker: HealthTracker,
    *,
    interval: float,
    wake: asyncio.Event,
) -> NoReturn:
    """Probe every `interval` seconds, and at once whenever `wake` is set."""
    while True:
        wake.clear()
        await probe_once(backend, tracker)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await wake.wait()


async def run_device_metrics(
    backend: DeviceBackend,
    *,
    interval: float,
    on_reading: Callable[[Mapping[str, GpuMetrics]], None],
) -> NoReturn:
    """Read every GPU's counters every `interval` seconds (in the backend's thread); a failed
    reading is the backend's to count, never a health verdict, and never stops the plugin."""
    while True:
        try:
            reading = await backend.read_metrics()
        except Exception as e:  # metrics are an extra: an odd driver answer must not kill serving
            log.warning("GPU metrics: reading failed, keeping the last one: %s", cut_text(repr(e)))
            metrics.observe_nvml_error("read_metrics")
        else:
            on_reading(reading)
        await asyncio.sleep(interval)


async def run_health_events(backend: DeviceBackend, tracker: HealthTracker) -> NoReturn:
    """Apply the backend's asynchronous fault reports (XIDs) as they come."""
    async with contextlib.aclosing(backend.health_events()) as events:
        async for event in events:
            tracker.on_event(event)
    raise RuntimeError("the backend's health events ended")
