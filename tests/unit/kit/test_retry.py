from __future__ import annotations

import asyncio
import itertools

import pytest

from aiodp.kit import retry
from aiodp.kit.errors import BackendUnavailable, cut_error


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


def test_retry_warning_keeps_the_reason_whole() -> None:
    """A long path is cut in its middle; the reason at the end stays (it read
    'NVML initi...Library Not Found' before)."""
    path = "/run/nvidia/driver/usr/lib/x86_64-linux-gnu/" + "d" * 300 + "/libnvidia-ml.so.1"
    e = BackendUnavailable(f"NVML initialisation failed: {path}: Library Not Found")
    text = cut_error(e)
    assert len(text) <= 240
    assert text.startswith("BackendUnavailable: NVML initialisation failed: /run/nvidia/")
    assert text.endswith("libnvidia-ml.so.1: Library Not Found")
    assert "..." in text
    short = BackendUnavailable("NVML initialisation failed: Library Not Found")
    assert cut_error(short) == "BackendUnavailable: NVML initialisation failed: Library Not Found"
    assert cut_error(TimeoutError()) == "TimeoutError"
    one_word = RuntimeError("x" * 1000)
    assert len(cut_error(one_word)) <= 240


async def test_retry_logs_the_whole_reason(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def op() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise BackendUnavailable("NVML initialisation failed: Library Not Found")
        return 1

    async def no_sleep(_: float) -> None:
        return None

    await retry.retrying(op, delays=[1.0], retry_on=(BackendUnavailable,), what="backend",
                         sleep=no_sleep)  # fmt: skip
    assert "retrying in" in caplog.text
    assert "BackendUnavailable: NVML initialisation failed: Library Not Found" in caplog.text
