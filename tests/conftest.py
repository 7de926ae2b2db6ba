"""Fixtures shared by every test: short socket directories, no leftover tasks, grpcio stubs."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short temporary directory: AF_UNIX paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="aiodp-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail any test that leaves tasks running on its loop."""
    yield
    me = asyncio.current_task()
    for _ in range(3):  # let tasks that are already finishing finish
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not left:
            return
        await asyncio.sleep(0)
    names = sorted(t.get_name() for t in left)
    raise AssertionError(f"tasks left running: {names}")
