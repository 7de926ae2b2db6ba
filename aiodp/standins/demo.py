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
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from grpclib import GRPCError

from aiodp import app
from aiodp.config.model import Config
from aiodp.kit import metrics
from aiodp.ops import statuscli
from aiodp.ops.status import Status
from aiodp.standins import testbed
from aiodp.standins.kubelet import FakeKubelet, Update
from aiodp.standins.podresources import FakePodResources
from aiodp.standins.testbed import DEMO_METRICS, h100_node, http_get, write_atomically


async def _next_update(kubelet: FakeKubelet, ok: Callable[[Update], bool]) -> Update:
    async with asyncio.timeout(10):
        return await testbed.next_update(kubelet, ok)


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
        devices_file.write_text(h100_node(metrics=DEMO_METRICS))
        config = dataclasses.replace(
            base,
            command="serve",
            backend="simulated",
            simulated_devices=devices_file,
            kubelet_socket=directory / "kubelet.sock",
            metrics_address="127.0.0.1:0" if base.metrics_address else "",
            pod_resources_socket=directory / "pod-resources" / "kubelet.sock",
            device_metrics_interval=0.2,
        )
        say(f"aiodp demo: plugin directory {directory}")
        stop, status = asyncio.Event(), Status()
        async with (
            FakeKubelet(directory) as kubelet,
            FakePodResources(directory / "pod-resources" / "kubelet.sock") as pods,
            asyncio.TaskGroup() as tg,
        ):
            t0 = time.monotonic()
            plugin = tg.create_task(
                app.main(config, stop=stop, status=status),
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
            resource = reg.resource  # nvidia.com/gpu, or what a config file names it
            sick_gpu = testbed.gpu_uuid(3)

            def of_gpu3(device_id: str) -> bool:  # the GPU itself, or one of its replicas
                return device_id.split("::")[0] == sick_gpu

            must = next((i for i in ids if i.split("::")[0] == testbed.gpu_uuid(5)), ids[-1])
            pick = await kubelet.preferred(resource, ids[::-1], [must], min(4, len(ids)))
            index = {testbed.gpu_uuid(i): i for i in range(8)}
            gpus = sorted(index.get(i.split("::")[0], -1) for i in pick)
            say(
                f"\n3. GetPreferredAllocation({len(pick)} of {len(ids)} {resource}, must "
                f"include GPU 5) -> GPUs {gpus}"
            )
            resp = await kubelet.allocate(resource, pick)
            say(f"   Allocate -> envs {dict(resp.container_responses[0].envs)}")
            pods.assign("default", "demo-train", "trainer", resource, pick)  # it started

            write_atomically(
                devices_file,
                h100_node({3: "XID 79 (simulated): GPU fell off the bus"}, DEMO_METRICS),
            )
            t = time.monotonic()
            up = await _next_update(
                kubelet,
                lambda u: any(of_gpu3(d.id) and d.health == "Unhealthy" for d in u.devices),
            )
            sick = _ms(up.at - t)
            write_atomically(devices_file, h100_node(metrics=DEMO_METRICS))
            t = time.monotonic()
            up = await _next_update(
                kubelet, lambda u: all(d.health == "Healthy" for d in u.devices)
            )
            say(
                f"\n4. fault injection: GPU 3 Unhealthy seen by the kubelet after {sick}; "
                f"Healthy again after {_ms(up.at - t)}"
            )
            try:
                await kubelet.allocate(resource, ["GPU-does-not-exist"])
            except GRPCError as e:
                say(f"   Allocate(unknown id) -> {e.status.name}: {e.message}")

            if status.endpoint is not None:
                url = f"http://{status.endpoint.address}"
                text = await http_get(status.endpoint.address, "/metrics")
                values = metrics.samples(text)
                ready_text = await http_get(status.endpoint.address, "/readyz")
                say(
                    f"\n   metrics and probes on {url}/metrics, /healthz, /readyz "
                    f"(readyz: {ready_text.strip()})"
                )
                for key in (
                    f'aiodp_devices{{health="Healthy",resource="{resource}"}}',
                    'aiodp_health_transitions_total{direction="to_unhealthy",'
                    f'reason="XID 79",resource="{resource}"}}',
                    'aiodp_requests_total{code="INVALID_ARGUMENT",method="Allocate",'
                    f'resource="{resource}"}}',
                    f'aiodp_registrations_total{{resource="{resource}",result="success"}}',
                ):
                    say(f"   {key} = {values.get(key, 0):g}")
                watts = [v for k, v in values.items() if k.startswith("aiodp_gpu_power_watts{")]
                if watts:
                    say(
                        f"   aiodp_gpu_power_watts: {len(watts)} GPUs, "
                        f"{min(watts):g}-{max(watts):g} W (the simulated file's metrics: blocks)"
                    )

            t = time.monotonic()
            await kubelet.restart()
            reg2 = await asyncio.wait_for(kubelet.registrations.get(), 10)
            await _next_update(kubelet, lambda u: bool(u.devices))
            say(
                f"\n5. kubelet restart: re-registered after {_ms(reg2.at - t)}, "
                f"device list back after {_ms(time.monotonic() - t)}"
            )
            if status.endpoint is not None:
                await asyncio.wait_for(pods.answered(), 10)  # the plugin has read the pod
                url = f"http://{status.endpoint.address}/status"
                doc = await asyncio.to_thread(statuscli.fetch, url)
                say(f"\n   `aiodp status` (from {url}):\n")
                say("   " + statuscli.table(doc).rstrip("\n").replace("\n", "\n   "))

            stop.set()
            code = await plugin
            left = _sockets(directory)
            say(f"\n6. stopped with exit code {code}; sockets left: {left}")
        return code
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(directory)
