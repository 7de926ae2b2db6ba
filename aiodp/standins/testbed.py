"""What the demo and the tests run the plugin on: a simulated 8-GPU node, atomic file edits,
a wait for the stand-in kubelet's next update, a tiny HTTP GET for our own endpoints, a
busy node (the plugin with counters, pods and /metrics) for the dashboard and the bench,
a free port and a process's RSS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiodp import app
from aiodp.config import resolve as cfg
from aiodp.ops.status import Status
from aiodp.standins.kubelet import FakeKubelet, Update
from aiodp.standins.podresources import FakePodResources

log = logging.getLogger(__name__)

GPUS: Final = 8


def free_port() -> int:
    """A loopback TCP port that is free now (for /metrics and the stand-ins' servers; the
    plugin's flag takes no port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS), MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def gpu_uuid(i: int) -> str:
    """The UUID of simulated GPU `i` of `h100_node`."""
    return f"GPU-{i:08x}-aiod-4d3e-8f00-{0x5EED0000 + i:012x}"


def h100_node(
    unhealthy: dict[int, str] | None = None,
    metrics: Mapping[int, Mapping[str, object]] | None = None,
) -> str:
    """The demo node as simulated-devices YAML: 8 H100s, NUMA 0 and 1, NVLink pairs; each
    GPU's `metrics:` block from `metrics` (field -> value)."""
    unhealthy, metrics = unhealthy or {}, metrics or {}
    lines = ["gpus:"]
    for i in range(GPUS):
        lines += [
            f"  - uuid: {gpu_uuid(i)}",
            "    name: NVIDIA H100 80GB HBM3",
            f"    index: {i}",
            "    memory_mib: 81559",
            f"    numa_node: {i // 4}",
            f'    pci_bus_id: "0000:{0x18 + 0x10 * i:02x}:00.0"',
            "    brand: Nvidia",
            "    architecture: Hopper",
            '    cuda_compute_capability: "9.0"',
            '    driver_version: "580.95.05"',
            '    cuda_driver_version: "13.0"',
            "    mig_capable: true",
        ]
        if i in unhealthy:
            lines += ["    health: Unhealthy", f"    reason: {json.dumps(unhealthy[i])}"]
        if i in metrics:
            lines.append(f"    metrics: {json.dumps(metrics[i])}")
    lines.append("nvlinks:")
    for a in range(GPUS):
        for b in range(a + 1, GPUS):
            same_numa = a // 4 == b // 4
            if same_numa or b == a + 4:
                lines.append(f"  - [{a}, {b}, {4 if same_numa else 2}]")
    return "\n".join(lines) + "\n"


DEMO_METRICS: Final[Mapping[int, Mapping[str, object]]] = {
    i: {
        "utilization_ratio": round(0.1 * i, 2),
        "memory_used_bytes": 2**30 * (4 * i + 1),
        "memory_total_bytes": 81559 * 2**20,
        "power_watts": 90 + 40 * i,
        "temperature_celsius": 30 + 3 * i,
        "ecc_uncorrected": 0,
    }
    for i in range(GPUS)
}
"""Readings the demo's simulated GPUs show on /metrics."""


def write_atomically(path: Path, text: str) -> None:
    """Replace a file by rename, as editors and ConfigMap updates do."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def next_update(kubelet: FakeKubelet, ok: Callable[[Update], bool]) -> Update:
    """The next ListAndWatch message the kubelet receives for which `ok` holds."""
    while True:
        update = await kubelet.updates.get()
        if ok(update):
            return update


async def http_get(address: str, path: str) -> str:
    """A tiny HTTP/1.1 GET, enough to read our own /metrics and probes; returns the body."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data.partition(b"\r\n\r\n")[2].decode()


@dataclass
class BusyNode:
    """The plugin on the demo's simulated H100s with counters, serving /metrics, with its
    kubelet and pod-resources stand-ins (`busy_node`)."""

    status: Status
    kubelet: FakeKubelet
    pods: FakePodResources
    devices_file: Path

    @property
    def address(self) -> str:
        assert self.status.endpoint is not None
        return self.status.endpoint.address


@contextlib.asynccontextmanager
async def busy_node(directory: Path, **overrides: object) -> AsyncIterator[BusyNode]:
    """Run the plugin (app.main) on the demo node with its counters, /metrics on a free
    port and pod attribution, under the kubelet stand-in; `overrides` are more settings (a
    `config_file` is read). Yields once the plugin is registered; stops it on exit."""
    devices = directory / "devices.yaml"
    devices.write_text(h100_node(metrics=DEMO_METRICS))
    sock = directory / "pr" / "kubelet.sock"
    settings: dict[str, object] = {
        "backend": "simulated", "simulated_devices": devices,
        "kubelet_socket": directory / "kubelet.sock", "metrics_address": "127.0.0.1:0",
        "pod_resources_socket": sock, **overrides,
    }  # fmt: skip
    path = settings.get("config_file")
    config = cfg.build(settings, cfg.load(path) if isinstance(path, Path) else None)
    stop, status = asyncio.Event(), Status()
    async with FakeKubelet(directory) as kubelet, FakePodResources(sock) as pods:
        task = asyncio.create_task(app.main(config, stop=stop, status=status))
        try:
            await status.ready.wait()
            yield BusyNode(status, kubelet, pods, devices)
        finally:
            stop.set()
            await task
