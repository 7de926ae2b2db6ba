"""Which small asyncio tools the supervisors share: a re-arming pulse, a first-of race, a
problem said once, and the shape of a list of named eternal tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NoReturn

log = logging.getLogger(__name__)

Tasks = list[tuple[str, Coroutine[Any, Any, NoReturn]]]
"""Named eternal coroutines, for a task group to run (each package hands its own to app)."""


class Pulse:
    """Wakes everyone waiting at the time of `notify()`; waiters re-check a condition."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds; re-checked after every `notify()`."""
        while True:
            event = self._event
            if condition():
                return
            await event.wait()


async def first_of(waits: Mapping[str, Coroutine[Any, Any, object]]) -> str:
    """Run the waits side by side; return the name of the first to finish, cancel the rest.

    The losers are cancelled by hand rather than by raising out of the TaskGroup: on
    Python 3.11 a child's exception raised while the parent waits in the group's exit
    leaves the parent marked as cancelling, which later turns timeouts into cancellations.
    """
    winners: list[str] = []
    done = asyncio.Event()

    async def run(name: str, wait: Coroutine[Any, Any, object]) -> None:
        await wait
        winners.append(name)
        done.set()

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(run(n, w), name=f"wait-{n}") for n, w in waits.items()]
        await done.wait()
        for task in tasks:
            task.cancel()
    return winners[0]


class Trouble:
    """One ongoing problem of an edge (an API, a socket): logged when it starts or changes,
    once when it ends, and never again while it stays the same."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.why: str | None = None
        """The problem now (a short text), None while all is well."""

    def failing(self, why: str, level: int, message: str, *args: object) -> None:
        if why != self.why:
            self.logger.log(level, message, *args)
        self.why = why

    def cleared(self, message: str, *args: object) -> None:
        if self.why is not None:
            self.logger.info(message, *args)
        self.why = None
