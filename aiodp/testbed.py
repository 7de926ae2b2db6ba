"""What the demo and the tests run the plugin on: a simulated 8-GPU node, atomic file edits,
a wait for the stand-in kubelet's next update, and a tiny HTTP GET for our own endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from aiodp.fakekubelet import FakeKubelet, Update

log = logging.getLogger(__name__)

GPUS: Final = 8


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
            f"  - uuid: GPU-{i:08x}-aiod-4d3e-8f00-{0x5EED0000 + i:012x}",
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
