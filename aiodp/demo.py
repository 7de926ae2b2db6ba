"""What aiodp does, shown end to end: `python -m aiodp demo` (and `make run`).

The plugin runs on 8 simulated H100s (two NUMA nodes, NVLink) against the embedded kubelet
stand-in in a temporary directory: registration, the device table, a preferred allocation
and an Allocate answer, a GPU failing and recovering through a live edit of the
simulated-devices file, a kubelet restart, a bad request; then a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from grpclib import GRPCError

from aiodp import app, metrics
from aiodp.config import RESOURCE_GPU, Config
from aiodp.fakekubelet import FakeKubelet, Update, next_update

GPUS = 8


def h100_node(unhealthy: dict[int, str] | None = None) -> str:
    """The demo node as simulated-devices YAML: 8 H100s, NUMA 0 and 1, NVLink pairs."""
    unhealthy = unhealthy or {}
    lines = ["gpus:"]
    for i in range(GPUS):
        lines += [
            f"  - uuid: GPU-{i:08x}-aiod-4d3e-8f00-{0x5EED0000 + i:012x}",
            "    name: NVIDIA H100 80GB HBM3",
            f"    index: {i}",
            "    memory_mib: 81559",
            f"    numa_node: {i // 4}",
            f'    pci_bus_id: "0000:{0x18 + 0x10 * i:02x}:00.0"',
        ]
        if i in unhealthy:
            lines += ["    health: Unhealthy", f"    reason: {json.dumps(unhealthy[i])}"]
    lines.append("nvlinks:")
    for a in range(GPUS):
        for b in range(a + 1, GPUS):
            same_numa = a // 4 == b // 4
            if same_numa or b == a + 4:
                lines.append(f"  - [{a}, {b}, {4 if same_numa else 2}]")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace a file by rename, as editors and ConfigMap updates do."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _next_update(kubelet: FakeKubelet, ok: Callable[[Update], bool]) -> Update:
    async with asyncio.timeout(10):
        return await next_update(kubelet, ok)


async def http_get(address: str, path: str) -> str:
    """A tiny HTTP/1.1 GET, enough to read our own /metrics and probes."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data.partition(b"\r\n\r\n")[2].decode()


def _sockets(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.sock"))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def run(base: Config) -> int:
    """Run the demo; returns the plugin's exit code (0 when all went well)."""
    say = print
    directory = Path(tempfile.mkdtemp(prefix="aiodp-demo-"))
    try:
        devices_file = directory / "devices.yaml"
        devices_file.write_text(h100_node())
        config = dataclasses.replace(
            base,
            command="serve",
            backend="simulated",
            simulated_devices=devices_file,
            kubelet_socket=directory / "kubelet.sock",
            metrics_address="127.0.0.1:0" if base.metrics_address else "",
        )
        say(f"aiodp demo: plugin directory {directory}")
        stop, ready, state = asyncio.Event(), asyncio.Event(), app.State()
        async with FakeKubelet(directory) as kubelet, asyncio.TaskGroup() as tg:
            t0 = time.monotonic()
            plugin = tg.create_task(
                app.main(config, stop=stop, ready=ready, state=state, handle_signals=False),
                name="plugin",
            )
            reg = await asyncio.wait_for(kubelet.registrations.get(), 10)
            say(
                f"\n1. registered {reg.resource} on endpoint {reg.endpoint} "
                f"after {_ms(reg.at - t0)}; options: preferred allocation "
                f"{reg.options.get_preferred_allocation_available}, pre-start "
                f"{reg.options.pre_start_required}"
            )
            first = await _next_update(kubelet, lambda u: bool(u.devices))
            say(
                f"\n2. the kubelet's device list ({len(first.devices)} devices, "
                f"{_ms(first.at - reg.at)} after registration):"
            )
            say(f"   {'ID':<44} {'health':<10} NUMA")
            for d in first.devices:
                numa = ",".join(str(n.id) for n in d.topology.nodes) if d.topology else "-"
                say(f"   {d.id:<44} {d.health:<10} {numa}")
            ids = [d.id for d in first.devices]

            pick = await kubelet.preferred(RESOURCE_GPU, ids[::-1], [ids[5]], 4)
            say(
                f"\n3. GetPreferredAllocation(4 of 8, must include GPU 5) -> "
                f"GPUs {sorted(ids.index(i) for i in pick)}"
            )
            resp = await kubelet.allocate(RESOURCE_GPU, pick)
            say(f"   Allocate -> envs {dict(resp.container_responses[0].envs)}")

            write_atomically(
                devices_file, h100_node({3: "XID 79 (simulated): GPU fell off the bus"})
            )
            t = time.monotonic()
            up = await _next_update(
                kubelet,
                lambda u: any(d.id == ids[3] and d.health == "Unhealthy" for d in u.devices),
            )
            sick = _ms(up.at - t)
            write_atomically(devices_file, h100_node())
            t = time.monotonic()
            up = await _next_update(
                kubelet, lambda u: all(d.health == "Healthy" for d in u.devices)
            )
            say(
                f"\n4. fault injection: GPU 3 Unhealthy seen by the kubelet after {sick}; "
                f"Healthy again after {_ms(up.at - t)}"
            )
            try:
                await kubelet.allocate(RESOURCE_GPU, ["GPU-does-not-exist"])
            except GRPCError as e:
                say(f"   Allocate(unknown id) -> {e.status.name}: {e.message}")

            if state.endpoint is not None:
                url = f"http://{state.endpoint.address}"
                text = await http_get(state.endpoint.address, "/metrics")
                values = metrics.samples(text)
                ready_text = await http_get(state.endpoint.address, "/readyz")
                say(
                    f"\n   metrics and probes on {url}/metrics, /healthz, /readyz "
                    f"(readyz: {ready_text.strip()})"
                )
                for key in (
                    'aiodp_devices{health="Healthy",resource="nvidia.com/gpu"}',
                    'aiodp_health_transitions_total{direction="to_unhealthy",'
                    'reason="XID 79",resource="nvidia.com/gpu"}',
                    'aiodp_requests_total{code="INVALID_ARGUMENT",method="Allocate",'
                    'resource="nvidia.com/gpu"}',
                    'aiodp_registrations_total{resource="nvidia.com/gpu",result="success"}',
                ):
                    say(f"   {key} = {values.get(key, 0):g}")

            t = time.monotonic()
            await kubelet.restart()
            reg2 = await asyncio.wait_for(kubelet.registrations.get(), 10)
            await _next_update(kubelet, lambda u: bool(u.devices))
            say(
                f"\n5. kubelet restart: re-registered after {_ms(reg2.at - t)}, "
                f"device list back after {_ms(time.monotonic() - t)}"
            )
            stop.set()
            code = await plugin
            left = _sockets(directory)
            say(f"\n6. stopped with exit code {code}; sockets left: {left}")
        return code
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(directory)
