"""How log records leave the process: one stderr handler, readable text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final, TextIO

FIELDS: Final = ("resource", "device", "reason", "xid", "generation", "duration_ms")
"""Structured fields that callers pass with `extra=` and the JSON format writes out."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the known fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Install the one stderr handler on the root logger (replacing earlier ones)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    # a log write that fails (a full disk, a closed pipe) is dropped, never a traceback that
    # would itself need writing; the plugin carries on
    logging.raiseExceptions = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in ("grpclib", "h2", "hpack", "asyncio"):
        logging.getLogger(name).setLevel(quiet)
