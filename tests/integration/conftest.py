"""The one `plugin` fixture of the integration tests: the real plugin, registered, first list in.

A test module shapes it with a module-level `PLUGIN_OPTIONS` dict of `harness.running`
keyword arguments (the simulated node, a metrics address, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Running, next_update, running


@pytest.fixture
async def plugin(short_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    options = getattr(request.module, "PLUGIN_OPTIONS", {})
    async with running(short_dir, **options) as rp:
        await rp.ready.wait()
        await next_update(rp.k, lambda u: bool(u.devices))
        yield rp
