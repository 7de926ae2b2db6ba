"""When devices turn Unhealthy or Healthy: backend probes applied to the registry, logged once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import NoReturn

from aiodp.backend import DeviceBackend
from aiodp.devices import Device, DeviceRegistry, Health

log = logging.getLogger(__name__)


def log_transitions(changes: Sequence[tuple[Device, Device]]) -> None:
    """One line per device that changed: WARNING when it fails, INFO when it recovers."""
    for old, new in changes:
        extra = {"resource": new.resource, "device": new.id, "reason": new.reason or old.reason}
        if new.health is Health.UNHEALTHY:
            log.warning(
                "device %s health %s -> %s (%s)",
                new.id,
                old.health.value,
                new.health.value,
                new.reason,
                extra=extra,
            )
        else:
            log.info(
                "device %s health %s -> %s (was: %s)",
                new.id,
                old.health.value,
                new.health.value,
                old.reason,
                extra=extra,
            )


async def probe_once(backend: DeviceBackend, registry: DeviceRegistry) -> None:
    """Probe every device's GPU once and apply the verdicts in one registry change."""
    gpus = sorted({d.uuid for d in registry.inventory().devices})
    probes = await backend.probe_health(gpus)
    changes = registry.apply_health({k: (p.health, p.reason) for k, p in probes.items()})
    log_transitions(changes)


async def run_health(
    backend: DeviceBackend,
    registry: DeviceRegistry,
    *,
    interval: float,
    wake: asyncio.Event,
) -> NoReturn:
    """Probe every `interval` seconds, and at once whenever `wake` is set."""
    while True:
        wake.clear()
        await probe_once(backend, registry)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await wake.wait()
