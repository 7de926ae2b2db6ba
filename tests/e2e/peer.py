"""The kubelet's own device manager as a test peer: the Go driver built by tests/e2e/build.sh.

The device manager listens on its fixed path, /var/lib/kubelet/device-plugins/kubelet.sock.
The driver runs in a mount namespace of its own (`unshare`) with the test's temporary
directory bound at that path, so the plugin under test, outside the namespace, uses the
temporary directory and the machine's real kubelet directory is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("AIODP_E2E_CACHE", Path.home() / ".cache" / "aiodp-e2e"))
KUBELET_DIR = "/var/lib/kubelet/device-plugins"


def versions() -> list[str]:
    """The Kubernetes versions whose device-manager driver was built, newest first."""
    found = [p.parent.name for p in CACHE.glob("v1.*/devicemanager")]
    if not found:
        raise RuntimeError(
            f"no device-manager driver under {CACHE}: run tests/e2e/build.sh (make e2e does)"
        )
    return sorted(found, key=lambda v: [int(x) for x in v[1:].split(".")], reverse=True)


class DriverError(RuntimeError):
    pass


class LineDriver:
    """A Go driver process spoken to in JSON lines: one command in, one answer out."""

    log: Path
    """Where the driver's stderr goes (quoted when it exits)."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    async def terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async def _read(self, within: float = 30) -> dict[str, Any]:
        assert self._proc is not None
        assert self._proc.stdout is not None
        async with asyncio.timeout(within):
            line = await self._proc.stdout.readline()
        if not line:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise DriverError(f"the driver exited; its log ends:\n{tail}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one command; its answer, or DriverError. The driver's own deadline is
        `timeout` (30 s when absent); we wait 30 s more."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        await self._proc.stdin.drain()
        reply = await self._read(within=float(args.get("timeout") or 30) + 30)
        if not reply.get("ok"):
            raise DriverError(f"{op} {args}: {reply}")
        return reply


class DeviceManager(LineDriver):
    """One driver process; `restart()` stops and starts the device manager in it (a kubelet
    restart with a clean Stop), `kill()` ends the process and starts another (a crash)."""

    def __init__(self, version: str, directory: Path) -> None:
        super().__init__()
        self.version = version
        self.directory = directory
        self.binary = CACHE / version / "devicemanager"
        self.log = directory.parent / "driver.log"

    async def __aenter__(self) -> DeviceManager:
        await self.spawn()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.terminate()

    async def spawn(self) -> None:
        script = f'mkdir -p {KUBELET_DIR} && mount --bind "$0" {KUBELET_DIR} && exec "$1" 2>"$2"'
        self._proc = await asyncio.create_subprocess_exec(
            "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(self.directory), str(self.binary), str(self.log),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        hello = await self._read()
        if hello.get("kubernetes") != self.version:
            raise DriverError(f"unexpected driver greeting: {hello}")

    async def start(self) -> float:
        """Start the device manager; returns when it started (wall clock, seconds)."""
        return float((await self.call("start"))["started_ns"]) / 1e9

    async def wait(self, resource: str, capacity: int, allocatable: int) -> float:
        """Until the kubelet counts these devices; returns when it did (wall clock)."""
        reply = await self.call(
            "wait", resource=resource, capacity=capacity, allocatable=allocatable, timeout=20
        )
        return float(reply["at_ns"]) / 1e9

    async def restart(self) -> float:
        await self.call("stop")
        return await self.start()

    async def kill(self) -> float:
        await self.terminate()
        await self.spawn()
        return await self.start()


@contextlib.asynccontextmanager
async def device_manager(version: str, directory: Path) -> AsyncIterator[DeviceManager]:
    async with DeviceManager(version, directory) as dm:
        await dm.start()
        yield dm


def dra_versions() -> list[str]:
    """The Kubernetes versions whose DRA kubelet driver was built, newest first."""
    found = [p.parent.name for p in CACHE.glob("v1.*/drakubelet")]
    if not found:
        raise RuntimeError(f"no drakubelet under {CACHE}: run tests/e2e/build.sh")
    return sorted(found, key=lambda v: [int(x) for x in v[1:].split(".")], reverse=True)


class DraKubelet(LineDriver):
    """The kubelet's plugin manager and DRA manager in one Go driver process (built by
    tests/e2e/build.sh); `call()` sends it one command."""

    def __init__(
        self, version: str, registry: Path, state: Path, kubeconfig: Path, node: str
    ) -> None:
        super().__init__()
        self.binary = CACHE / version / "drakubelet"
        if not self.binary.exists():
            raise RuntimeError(f"no {self.binary}: run tests/e2e/build.sh")
        self.version = version
        self.args = [str(registry), str(state), str(kubeconfig), node]
        self.log = state.parent / "drakubelet.log"

    async def __aenter__(self) -> DraKubelet:
        with self.log.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                str(self.binary), *self.args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        hello = await self._read(30)
        if not hello.get("ok"):
            raise DriverError(f"drakubelet did not start: {hello}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.terminate()
