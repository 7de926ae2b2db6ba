"""The DRA health stream: every device with a timeout, and the full list sent again before
the kubelet's health of it goes stale (Unknown in pod status)."""

from __future__ import annotations

import pytest

from aiodp.dra import plugin
from aiodp.gpus import sharing
from aiodp.gpus.devices import DeviceRegistry, Health, Uuid
from tests.builders import gpu

RES = sharing.dra_resource("gpu.aiodp.io")


@pytest.mark.timeout(10)
async def test_health_stream_resends_the_full_list_and_sets_a_timeout() -> None:
    registry = DeviceRegistry([gpu(0, resource=RES), gpu(1, resource=RES)])
    streams = plugin.HealthStreams(registry, RES, "node-1", resend=0.01)
    lists = streams.lists()
    first = await anext(lists)
    again = await anext(lists)  # nothing changed: sent again after `resend`
    assert bytes(again) == bytes(first)
    assert [d.health_check_timeout_seconds for d in first.devices] == [60, 60]
    assert plugin.RESEND < plugin.HEALTH_TIMEOUT / 2
    registry.apply_health({Uuid("GPU-1"): (Health.UNHEALTHY, "XID 79")})
    changed = await anext(lists)
    assert [d.message for d in changed.devices] == ["", "XID 79"]
    await lists.aclose()


@pytest.mark.timeout(10)
async def test_health_stream_sends_a_change_at_once() -> None:
    registry = DeviceRegistry([gpu(0, resource=RES)])
    streams = plugin.HealthStreams(registry, RES, "node-1", resend=3600)
    lists = streams.lists()
    await anext(lists)
    registry.apply_health({Uuid("GPU-0"): (Health.UNHEALTHY, "XID 48")})
    changed = await anext(lists)  # within the test's timeout: not after an hour
    assert changed.devices[0].message == "XID 48"
    await lists.aclose()
