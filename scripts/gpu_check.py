"""Smoke run on a real GPU: NVML discovery and a probe, then the plugin against the
kubelet stand-in, an Allocate with device specs, and a check that every path exists."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from aiodp import app
from aiodp.backend import control_paths
from aiodp.config import RESOURCE_GPU, Config
from aiodp.errors import BackendUnavailable
from aiodp.fakekubelet import FakeKubelet
from aiodp.nvml import NvmlBackend


async def main() -> int:
    directory = Path(tempfile.mkdtemp(prefix="aiodp-gpu-"))
    config = Config(
        backend="nvml",
        kubelet_socket=directory / "kubelet.sock",
        pass_device_specs=True,
        metrics_address="",
    )
    t0 = time.monotonic()
    try:
        async with NvmlBackend() as backend:
            infos = await backend.discover()
            probes = await backend.probe_health([g.uuid for g in infos])
            topo = await backend.topology()
            control = control_paths(config.dev_root)
    except BackendUnavailable as e:
        print(f"gpu-check: {e}")
        return 1
    print(f"discovery + probe: {len(infos)} GPU(s) in {(time.monotonic() - t0) * 1000:.0f} ms")
    print(f"{'idx':>3} {'uuid':<42} {'name':<26} {'MiB':>7} {'NUMA':>4} {'bus id':<16} health")
    for g in infos:
        p = probes[g.uuid]
        numa = "-" if g.numa_node is None else g.numa_node
        print(
            f"{g.index:>3} {g.uuid:<42} {g.name[:26]:<26} {g.memory_mib:>7} {numa:>4} "
            f"{g.pci_bus_id:<16} {p.health.value} {p.reason}"
        )
        for m in g.mig_devices:
            print(f"    MIG {m.uuid} {m.profile} gi={m.gi} ci={m.ci} {m.paths}")
    uuids = [g.uuid for g in infos]
    pairs = [(a, b, topo.score(a, b)) for i, a in enumerate(uuids) for b in uuids[i + 1 :]]
    print(f"control nodes: {list(control)}; pair scores: {[s for *_, s in pairs][:28]}")

    stop = asyncio.Event()
    async with FakeKubelet(directory) as kubelet, asyncio.TaskGroup() as tg:
        task = tg.create_task(app.main(config, stop=stop))
        reg = await asyncio.wait_for(kubelet.registrations.get(), 30)
        update = await asyncio.wait_for(kubelet.updates.get(), 30)
        print(
            f"registered {reg.resource}; kubelet sees {[(d.id, d.health) for d in update.devices]}"
        )
        healthy = [d.id for d in update.devices if d.health == "Healthy"]
        resp = await kubelet.allocate(RESOURCE_GPU, healthy)
        answer = resp.container_responses[0]
        print(f"Allocate envs: {dict(answer.envs)}")
        missing = [s.host_path for s in answer.devices if not Path(s.host_path).exists()]
        print(f"device specs: {[s.host_path for s in answer.devices]}; missing: {missing}")
        stop.set()
        code = await task
    ok = not missing and code == 0 and all(p.health.value == "Healthy" for p in probes.values())
    print(f"gpu-check: {'PASS' if ok else 'FAIL'} in {time.monotonic() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
