"""The command line: argv and environment -> Config -> logging -> the event loop -> exit code."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from aiodp import app, config, demo, logs
from aiodp.errors import ConfigError

log = logging.getLogger("aiodp")


def _run(coro: object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config.resolve(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as e:
        logs.configure()
        log.error("%s", e)
        return 2
    if cfg.command == "demo":
        # The demo prints its own story on stdout; logs stay for warnings unless debugging.
        logs.configure("debug" if cfg.log_level == "debug" else "warning", cfg.log_format)
        return _run(demo.run(cfg))
    logs.configure(cfg.log_level, cfg.log_format)
    return _run(app.main(cfg))


if __name__ == "__main__":
    sys.exit(main())
