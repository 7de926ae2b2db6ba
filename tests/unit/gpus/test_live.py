"""The one live holder: current state at once, then only the latest after changes."""

from __future__ import annotations

import asyncio
import dataclasses

from aiodp.config.model import Config
from aiodp.gpus import live as reload
from aiodp.gpus import sharing
from aiodp.gpus.topology import Topology


def live(**config: object) -> reload.Live:
    return reload.Live(
        dataclasses.replace(Config(), **config),  # type: ignore[arg-type]
        sharing.Plan((), ()),
        Topology(),
        (),
    )


async def test_reload_holder_watch_is_latest_wins() -> None:
    holder = reload.Holder(live())
    seen: list[reload.Live] = []
    got = asyncio.Event()

    async def watcher() -> None:
        async for current in holder.watch():
            seen.append(current)
            got.set()

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(watcher())
        await got.wait()
        got.clear()
        for interval in (1.0, 2.0, 3.0):  # three changes before the watcher runs again
            holder.install(live(health_interval=interval))
        await got.wait()
        task.cancel()
    assert [s.version for s in seen] == [0, 3]
    assert seen[-1].config.health_interval == 3.0
    assert holder.current() is seen[-1]
