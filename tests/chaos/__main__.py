"""`make chaos`: every row at full size against a fresh plugin process, one table, exit 1 when
a row lost something or grew past its bound."""

from __future__ import annotations

import asyncio
import sys
import time

import uvloop

from tests.chaos.run import run_all


def main() -> int:
    scale = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    t = time.monotonic()
    results = uvloop.run(run_all(scale))
    print(f"\nchaos suite: {len(results)} rows in {time.monotonic() - t:.0f} s")  # noqa: T201
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
