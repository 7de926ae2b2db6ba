"""Running a helper binary (the MPS control binary, nvidia-smi, mount): a subprocess, so never
on the loop's thread, bounded in time and in what is kept of its answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Final

MAX_OUTPUT: Final = 4096
"""Bytes of a helper's answer kept: real answers are a line or two."""


async def run(
    argv: Sequence[str],
    *,
    within: float,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    limit: int = MAX_OUTPUT,
) -> tuple[int, str]:
    """(exit code, its stdout and stderr together: the first `limit` bytes, stripped).

    Raises OSError when it cannot be started, and TimeoutError when it has not ended within
    `within` seconds (it is killed and reaped first)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=dict(env) if env is not None else None,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(within):
            out, _ = await proc.communicate(None if stdin is None else stdin.encode())
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out[:limit].decode("utf-8", "replace").strip()
