"""The registry's watch always ends on the latest state, whatever the interleaving."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from aiodp.gpus.devices import Device, DeviceRegistry, Health
from tests.builders import gpu, set_health

RES = "nvidia.com/gpu"
steps = st.lists(
    st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), min_size=1, max_size=30
)


@settings(max_examples=100, deadline=None)
@given(steps)
def test_registry_props_watch_ends_on_latest(script: list[tuple[int, bool, bool]]) -> None:
    async def run() -> None:
        reg = DeviceRegistry(gpu(i, uuid=f"G{i}", resource=RES, paths=()) for i in range(4))
        stop = asyncio.Event()
        seen: list[tuple[Device, ...]] = []

        async def reader() -> None:
            async for devices in reg.watch(RES, until=stop):
                seen.append(devices)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(reader())
            for g, healthy, pause in script:
                health = Health.HEALTHY if healthy else Health.UNHEALTHY
                set_health(reg, [f"G{g}"], health, "x")
                if pause:
                    await asyncio.sleep(0)  # let the reader run between some changes
            for _ in range(3):
                await asyncio.sleep(0)
            stop.set()
            reg.wake()
        assert seen[-1] == reg.inventory().for_resource(RES)
        # consecutive snapshots always differ: unchanged state wakes nobody
        assert all(a != b for a, b in itertools.pairwise(seen))

    asyncio.run(run())
