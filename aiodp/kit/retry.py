"""How a transient failure is retried: delays as data, jitter, cancellable waits."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

from aiodp.kit.errors import cut_error

log = logging.getLogger(__name__)

T = TypeVar("T")


def backoff(
    delays: Sequence[float], *, jitter: float = 0.2, rand: Callable[[], float] = random.random
) -> Iterator[float]:
    """The delays in order, then the last one forever, each scaled by 1 +- jitter."""
    if not delays:
        raise ValueError("backoff needs at least one delay")
    i = 0
    while True:
        base = delays[min(i, len(delays) - 1)]
        yield base * (1.0 + jitter * (2.0 * rand() - 1.0))
        i += 1


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    delays: Sequence[float],
    retry_on: tuple[type[BaseException], ...],
    what: str,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> T:
    """Run `op` until it succeeds; only `retry_on` errors are retried, others propagate.

    `sleep` may return early (e.g. when the kubelet socket appears) to retry at once.
    """
    attempt = 0
    waits = backoff(delays, rand=rand)
    while True:
        attempt += 1
        try:
            result = await op()
        except retry_on as e:
            delay = next(waits)
            log.warning(
                "%s attempt #%d failed; retrying in %.1fs: %s", what, attempt, delay, cut_error(e)
            )
            await sleep(delay)
            continue
        if attempt > 1:
            log.info("%s succeeded after %d attempts", what, attempt)
        return result
