"""The command line: argv and environment -> Config -> logging -> the event loop -> exit code."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import aiodp
from aiodp.config import resolve as config
from aiodp.kit import logs
from aiodp.kit.errors import ConfigError

# Each command imports what it runs (start-up time: `serve` never loads the demo, the kubelet
# stand-in or the status client; `status` never loads the plugin).

log = logging.getLogger("aiodp")


def _run(coro: object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def version_line() -> str:
    """`aiodp <version> (commit <sha>)`: the commit from AIODP_COMMIT (set in the image) or
    from the source checkout, when there is one."""
    commit = os.environ.get("AIODP_COMMIT", "")
    if not commit:
        here = Path(__file__).resolve().parent.parent
        if (here / ".git").exists():
            try:
                commit = subprocess.run(
                    ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                    capture_output=True, text=True, timeout=5, check=True,
                ).stdout.strip()  # fmt: skip
            except (OSError, subprocess.SubprocessError):
                commit = ""
    return f"aiodp {aiodp.__version__} (commit {commit or 'unknown'})"


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if "--version" in args:
        print(version_line())  # noqa: T201 - the command's answer
        return 0
    if args[:1] == ["config-manager"]:  # NVIDIA's sidecar, for the GPU Operator's DaemonSet
        logs.configure()
        from aiodp.ops import configmanager

        return configmanager.main(args[1:], os.environ)
    try:
        cfg = config.resolve(args, os.environ)
    except ConfigError as e:
        logs.configure()
        log.error("%s", e)
        return 2
    if cfg.command == "status":
        from aiodp.ops import statuscli

        return statuscli.run(cfg)
    if cfg.command == "demo":
        # The demo prints its own story on stdout; logs stay for warnings unless debugging.
        logs.configure("debug" if cfg.log_level == "debug" else "warning", cfg.log_format)
        from aiodp.standins import demo

        return _run(demo.run(cfg))
    logs.configure(cfg.log_level, cfg.log_format)
    from aiodp import app

    return _run(app.main(cfg))


if __name__ == "__main__":
    sys.exit(main())
