from __future__ import annotations

import asyncio

from aiodp.gpus.devices import Device, DeviceRegistry, Health
from tests.builders import gpu, mig, set_health


def dev(i: int, *, resource: str = "nvidia.com/gpu") -> Device:
    return gpu(i, resource=resource, numa_node=0)


def test_devices_set_health_reports_changes_once() -> None:
    reg = DeviceRegistry([dev(0), dev(1)])
    v0 = reg.inventory().version
    changes = set_health(reg, ["GPU-1"], Health.UNHEALTHY, "XID 79")
    assert [(o.health, n.health, n.reason) for o, n in changes] == [
        (Health.HEALTHY, Health.UNHEALTHY, "XID 79")
    ]
    assert reg.inventory().version == v0 + 1
    assert set_health(reg, ["GPU-1"], Health.UNHEALTHY, "XID 79") == ()
    assert reg.inventory().version == v0 + 1
    back = set_health(reg, ["GPU-1"], Health.HEALTHY, "ignored")
    assert back[0][1].health is Health.HEALTHY
    assert back[0][1].reason == ""


def test_devices_fan_out_by_parent_gpu() -> None:
    child = mig("MIG-a", "GPU-0", "0:0")
    reg = DeviceRegistry([dev(0), child, dev(1)])
    changes = set_health(reg, ["GPU-0"], Health.UNHEALTHY, "lost")
    assert sorted(n.id for _, n in changes) == ["GPU-0", "MIG-a"]


def test_devices_inventory_sorted_by_resource_then_index() -> None:
    reg = DeviceRegistry([dev(10), dev(2), dev(1)])
    assert [d.index for d in reg.inventory().devices] == ["1", "2", "10"]
    assert reg.get("GPU-2") == dev(2)
    assert reg.get("nope") is None


async def test_devices_watch_sends_current_then_latest_only() -> None:
    reg = DeviceRegistry([dev(0), dev(1)])
    stop = asyncio.Event()
    stream = reg.watch("nvidia.com/gpu", until=stop)
    first = await anext(stream)
    assert [d.health for d in first] == [Health.HEALTHY, Health.HEALTHY]
    # three changes before the reader comes back: it sees only the latest
    set_health(reg, ["GPU-0"], Health.UNHEALTHY, "a")
    set_health(reg, ["GPU-1"], Health.UNHEALTHY, "b")
    set_health(reg, ["GPU-0"], Health.HEALTHY)
    second = await anext(stream)
    assert [d.health for d in second] == [Health.HEALTHY, Health.UNHEALTHY]
    stop.set()
    reg.wake()
    assert [x async for x in stream] == []


async def test_devices_watch_ignores_other_resources() -> None:
    other = dev(5, resource="nvidia.com/gpu.shared")
    reg = DeviceRegistry([dev(0), other])
    stop = asyncio.Event()
    stream = reg.watch("nvidia.com/gpu", until=stop)
    assert len(await anext(stream)) == 1
    set_health(reg, ["GPU-5"], Health.UNHEALTHY, "x")
    set_health(reg, ["GPU-0"], Health.UNHEALTHY, "y")
    (only,) = await anext(stream)
    assert only.id == "GPU-0"
    assert only.health is Health.UNHEALTHY
    stop.set()
    reg.wake()
    await stream.aclose()


def test_devices_replace_reports_change() -> None:
    reg = DeviceRegistry([dev(0)])
    assert reg.replace([dev(0)]) is False
    assert reg.replace([dev(0), dev(1)]) is True
    assert len(reg.inventory().devices) == 2
