"""Run the chaos rows, each on a fresh plugin process, and judge them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tests.chaos.rig import Sample, rig
from tests.chaos.rows import ROWS, Spec

MAX_FD_GROWTH = 3
MAX_TASK_GROWTH = 2
MAX_RSS_GROWTH_MIB = 24.0
MAX_PEAK_RSS_MIB = 192.0
"""The chart's memory limit: the plugin must never reach it."""


@dataclass(frozen=True)
class Result:
    name: str
    figure: str
    lost: str | None
    before: Sample
    after: Sample
    peak_rss_mib: float

    @property
    def growth(self) -> str:
        a, b = self.after, self.before
        return (
            f"fd {a.fds - b.fds:+d}, tasks {a.tasks - b.tasks:+d}, "
            f"RSS {a.rss_mib - b.rss_mib:+.1f} MiB (peak {self.peak_rss_mib:.0f})"
        )

    @property
    def bounded(self) -> str | None:
        """None when nothing grew past its bound."""
        if self.after.fds - self.before.fds > MAX_FD_GROWTH:
            return "file descriptors grew"
        if self.after.tasks - self.before.tasks > MAX_TASK_GROWTH:
            return "tasks grew"
        if self.after.rss_mib - self.before.rss_mib > MAX_RSS_GROWTH_MIB:
            return "RSS grew"
        if self.peak_rss_mib > MAX_PEAK_RSS_MIB:
            return "RSS peaked over the chart's limit"
        return None

    @property
    def ok(self) -> bool:
        return self.lost is None and self.bounded is None


async def run_row(spec: Spec, scale: float) -> Result:
    async with rig() as r:
        before = await r.settled()
        stop = asyncio.Event()
        watcher = asyncio.create_task(r.watch_rss(stop))
        try:
            figure, lost = await spec.run(r, scale)
            lost = lost or await r.intact()
        finally:
            stop.set()
            await watcher
        after = await r.settled()
        return Result(spec.name, figure, lost, before, after, r.peak_rss_mib)


def line(r: Result) -> str:
    verdict = "yes" if r.lost is None else f"NO: {r.lost}"
    bound = "" if r.bounded is None else f"  <- {r.bounded}"
    return f"| {r.name} | {r.figure} | {verdict} | {r.growth}{bound} |"


async def run_all(scale: float) -> list[Result]:
    print("| test | figure | nothing lost | fd, task and RSS growth |")  # noqa: T201
    print("|---|---|---|---|")  # noqa: T201
    results = []
    for spec in ROWS:
        result = await run_row(spec, scale)
        print(line(result), flush=True)  # noqa: T201
        results.append(result)
    return results
