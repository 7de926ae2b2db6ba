"""The chaos rig: `aiodp serve` as its own process, the kubelet stand-in in ours, and a way to
read the plugin's file descriptors, tasks and memory while it is attacked."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from aiodp.kit import metrics
from aiodp.standins.kubelet import FakeKubelet, Update
from aiodp.standins.testbed import free_port, h100_node, http_get, next_update, write_atomically

GPU = "nvidia.com/gpu"


@dataclass(frozen=True)
class Sample:
    fds: int
    tasks: int
    rss_mib: float


@dataclass
class Rig:
    directory: Path
    kubelet: FakeKubelet
    proc: asyncio.subprocess.Process
    address: str
    devices_file: Path
    config_file: Path
    registrations: int = 1
    """Registrations the kubelet has seen (kept in step by the rows)."""
    peak_rss_mib: float = 0.0
    _ps: psutil.Process | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.directory / "aiodp-nvidia-gpu.sock"

    async def sample(self) -> Sample:
        """The plugin's open fds, live tasks and RSS, from its own /metrics."""
        values = metrics.samples(await http_get(self.address, "/metrics"))
        return Sample(
            int(values["process_open_fds"]),
            int(values["aiodp_asyncio_tasks"]),
            values["process_resident_memory_bytes"] / (1 << 20),
        )

    async def settled(self) -> Sample:
        """A sample once closing connections have been reaped: two alike, 50 ms apart."""
        last = await self.sample()
        for _ in range(20):
            await asyncio.sleep(0.05)  # another process: nothing to wait on but time
            now = await self.sample()
            if (now.fds, now.tasks) == (last.fds, last.tasks):
                return now
            last = now
        return last

    def rss_mib(self) -> float:
        assert self._ps is not None
        return float(self._ps.memory_info().rss) / (1 << 20)

    async def watch_rss(self, stop: asyncio.Event) -> None:
        """Sample RSS every 20 ms while an attack runs (the peak, not only the end)."""
        while not stop.is_set():
            self.peak_rss_mib = max(self.peak_rss_mib, self.rss_mib())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.02):
                    await stop.wait()

    async def next(self, ok: Callable[[Update], bool], within: float = 20) -> Update:
        async with asyncio.timeout(within):
            return await next_update(self.kubelet, ok)

    async def intact(self) -> str | None:
        """None when nothing was lost: still registered once, the right list, Allocate right,
        and a health change still reaches the kubelet (both ways)."""
        if self.proc.returncode is not None:
            return f"the plugin exited with {self.proc.returncode}"
        extra = self.kubelet.registrations.qsize()
        if extra:
            return f"{extra} unexpected registration(s)"
        devices = self.kubelet.devices(GPU)
        if len(devices) != 8 or any(d.health != "Healthy" for d in devices):
            return f"device list wrong: {[(d.id, d.health) for d in devices]}"
        first = devices[0].id
        resp = await self.kubelet.allocate(GPU, [first])
        if resp.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] != first:
            return "Allocate answered wrong"
        write_atomically(self.devices_file, h100_node({5: "XID 79 (chaos)"}))
        await self.next(lambda u: any(d.health == "Unhealthy" for d in u.devices))
        write_atomically(self.devices_file, h100_node())
        await self.next(lambda u: bool(u.devices) and all(d.health == "Healthy" for d in u.devices))
        return None


@contextlib.asynccontextmanager
async def rig(*extra: str) -> AsyncIterator[Rig]:
    """The plugin on 8 simulated GPUs with a config file, registered, first list in."""
    directory = Path(tempfile.mkdtemp(prefix="aiodp-chaos-"))
    devices, config = directory / "devices.yaml", directory / "config.yaml"
    devices.write_text(h100_node())
    config.write_text("version: v1\n")
    address = f"127.0.0.1:{free_port()}"
    log = (directory / "plugin.log").open("wb")
    try:
        async with FakeKubelet(directory) as kubelet:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aiodp", "serve", "--backend=simulated",
                f"--simulated-devices={devices}", f"--config-file={config}",
                f"--kubelet-socket={directory / 'kubelet.sock'}", f"--metrics-address={address}",
                "--log-level=warning", *extra,
                stderr=log,
            )  # fmt: skip
            try:
                async with asyncio.timeout(20):
                    await kubelet.registrations.get()
                    await next_update(kubelet, lambda u: bool(u.devices))
                r = Rig(directory, kubelet, proc, address, devices, config)
                r._ps = psutil.Process(proc.pid)
                yield r
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    async with asyncio.timeout(15):
                        await proc.wait()
    finally:
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def plugin_log(r: Rig) -> str:
    return (r.directory / "plugin.log").read_text(errors="replace")
