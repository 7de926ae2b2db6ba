"""A small version of every `make chaos` row, in `make test`: nothing lost, nothing grew."""

from __future__ import annotations

import pytest

from tests.chaos.rows import ROWS, Spec
from tests.chaos.run import line, run_row

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.mark.parametrize("spec", ROWS, ids=[s.name for s in ROWS])
async def test_chaos_small(spec: Spec) -> None:
    result = await run_row(spec, 0.02)
    assert result.lost is None, line(result)
    assert result.bounded is None, line(result)
