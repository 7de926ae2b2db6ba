from __future__ import annotations

import asyncio
import itertools

import pytest

from aiodp.kit import retry


def test_retry_backoff_repeats_the_last_delay_with_jitter() -> None:
    delays = list(itertools.islice(retry.backoff((1, 2, 4), rand=lambda: 0.5), 5))
    assert delays == [1, 2, 4, 4, 4]
    low = list(itertools.islice(retry.backoff((10,), rand=lambda: 0.0), 2))
    high = list(itertools.islice(retry.backoff((10,), rand=lambda: 1.0), 2))
    assert low == [8.0, 8.0]
    assert high == [12.0, 12.0]
    with pytest.raises(ValueError, match="at least one delay"):
        next(retry.backoff(()))


@pytest.mark.looptime
async def test_retry_retrying_waits_the_delays_then_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def op() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise ConnectionRefusedError("not yet")
        return "ok"

    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await retry.retrying(
        op, delays=(1, 2, 4), retry_on=(OSError,), what="thing", rand=lambda: 0.5
    )
    assert result == "ok"
    assert calls == 4
    assert loop.time() - start == pytest.approx(7)
    assert "thing attempt #3 failed; retrying in 4.0s" in caplog.text
    assert "thing succeeded after 4 attempts" in caplog.text


async def test_retry_other_errors_propagate_at_once() -> None:
    async def op() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await retry.retrying(op, delays=(1,), retry_on=(OSError,), what="x")
