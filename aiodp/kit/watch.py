"""What changed in a directory: inotify read from the event loop itself (no thread, no polling).

One `DirWatch` per directory counts the events per file name; waiters re-check their own
condition after each batch. Files are watched through their directory, by name, so that
editors' renames and a ConfigMap volume's `..data` symlink swap are seen.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import AsyncGenerator, Callable, Collection
from pathlib import Path
from typing import Final, Self

from inotify_simple import INotify
from inotify_simple import flags as F

log = logging.getLogger(__name__)

MASK: Final = (
    F.CREATE | F.DELETE | F.MOVED_TO | F.MOVED_FROM | F.CLOSE_WRITE | F.DELETE_SELF | F.MOVE_SELF
)
CONFIGMAP_DATA: Final = "..data"


class DirWatch:
    """Counts inotify events per name in one directory and wakes waiters on each batch."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.counts: collections.Counter[str] = collections.Counter()
        self.overflows = 0
        self._ino: INotify | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Self:
        ino = INotify(nonblocking=True)
        try:
            ino.add_watch(str(self.directory), MASK)
        except OSError:
            ino.close()
            raise
        self._ino = ino
        asyncio.get_running_loop().add_reader(ino.fileno(), self.drain)
        return self

    async def __aexit__(self, *exc: object) -> None:
        ino, self._ino = self._ino, None
        if ino is not None:
            asyncio.get_running_loop().remove_reader(ino.fileno())
            ino.close()

    def drain(self) -> None:
        """Take every queued event now; called by the loop and before any decision."""
        if self._ino is None:
            return
        events = self._ino.read(timeout=0)
        if not events:
            return
        for ev in events:
            if ev.mask & F.Q_OVERFLOW:
                self.overflows += 1
            if ev.mask & (F.DELETE_SELF | F.MOVE_SELF):
                log.error("watched directory %s was removed or moved", self.directory)
            self.counts[ev.name] += 1
        log.debug("inotify %s: %s", self.directory, [(e.name, e.mask) for e in events])
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def seen(self, names: Collection[str]) -> int:
        """How many events so far named any of `names` (queue overflows count for all)."""
        self.drain()
        return sum(self.counts[n] for n in names) + self.overflows

    async def wait(self, ready: Callable[[], bool]) -> None:
        """Return once `ready()` holds; it is re-checked after every batch of events."""
        while True:
            self.drain()
            changed = self._changed
            if ready():
                return
            await changed.wait()

    async def changes(self, names: Collection[str]) -> AsyncGenerator[None, None]:
        """Yield after each batch of events that names any of `names` (bursts coalesce)."""
        last = self.seen(names)
        while True:
            await self.wait(lambda seen=last: self.seen(names) != seen)  # type: ignore[misc]
            last = self.seen(names)  # before yielding: changes made meanwhile count next time
            yield


def is_directory(path: Path) -> bool:
    """One stat: cheap enough to call from the loop."""
    return os.path.isdir(path)


def _nearest_existing(path: Path) -> Path:
    for parent in path.parents:
        if parent.is_dir():
            return parent
    return Path("/")


async def wait_for_directory(path: Path) -> None:
    """Return once `path` is a directory, watching its nearest existing ancestor (a booting
    node's kubelet creates its directories after we start); says so once."""
    told = False
    while not is_directory(path):
        ancestor = _nearest_existing(path)
        step = ancestor / path.relative_to(ancestor).parts[0]
        if not told:
            log.info("waiting for %s to be created (watching %s)", path, ancestor)
            told = True
        async with DirWatch(ancestor) as dw:
            await dw.wait(step.exists)
    if told:
        log.info("%s is there now", path)


async def file_changes(path: Path) -> AsyncGenerator[None, None]:
    """Yield after each change of `path`: write in place, rename over it, ConfigMap swap."""
    async with DirWatch(path.parent) as dw:
        async for _ in dw.changes((path.name, CONFIGMAP_DATA)):
            yield
