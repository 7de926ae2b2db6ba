"""Smoke run on a real GPU: NVML discovery and a probe, then the plugin against the
kubelet stand-in, an Allocate with device specs, and a check that every path exists; then
aiodp's GPU metrics next to `nvidia-smi --query-gpu` for the same quantities, each pair
within its stated tolerance."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from aiodp import app
from aiodp.config.model import RESOURCE_GPU, Config
from aiodp.gpus.backend import GpuMetrics, control_paths
from aiodp.gpus.nvml import NvmlBackend
from aiodp.kit.errors import BackendUnavailable
from aiodp.standins.kubelet import FakeKubelet

SMI_FIELDS = (
    "uuid,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu,clocks.sm,"
    "clocks.mem,ecc.errors.corrected.volatile.total,ecc.errors.uncorrected.volatile.total"
)
# (nvidia-smi column, our field, factor from ours to nvidia-smi's unit, tolerance, why)
PAIRS: tuple[tuple[str, str, float, float, str], ...] = (
    ("utilization.gpu", "utilization_ratio", 100, 25, "% points: sampled at different times"),
    ("memory.used", "memory_used_bytes", 1 / 2**20, 1024, "MiB: nvidia-smi may leave out "
     "driver-reserved memory (memory info v2)"),
    ("memory.total", "memory_total_bytes", 1 / 2**20, 1024, "MiB: the same, for the total"),
    ("power.draw", "power_watts", 1, 25, "W: instantaneous, read a moment apart"),
    ("temperature.gpu", "temperature_celsius", 1, 3, "C"),
    ("clocks.sm", "sm_clock_hertz", 1e-6, 300, "MHz: clocks move with load and power state"),
    ("clocks.mem", "memory_clock_hertz", 1e-6, 100, "MHz"),
    ("ecc.errors.corrected.volatile.total", "ecc_corrected", 1, 0, "count"),
    ("ecc.errors.uncorrected.volatile.total", "ecc_uncorrected", 1, 0, "count"),
)  # fmt: skip


def compare(ours: Mapping[str, GpuMetrics], smi_csv: str) -> list[tuple[str, str, str, str, bool]]:
    """(GPU, quantity, ours, nvidia-smi's, agrees) for every pair both sides report."""
    rows = []
    for line in smi_csv.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        uuid, smi = values[0], dict(zip(SMI_FIELDS.split(",")[1:], values[1:], strict=False))
        mine = ours.get(uuid)
        for column, field, factor, tolerance, _ in PAIRS:
            theirs, value = smi.get(column, ""), None if mine is None else getattr(mine, field)
            try:
                expected = float(theirs)
            except ValueError:
                continue  # [N/A] or [Not Supported]: nothing to compare
            if value is None:
                rows.append((uuid, column, "absent", theirs, False))
                continue
            got = value * factor
            rows.append((uuid, column, f"{got:.1f}", theirs, abs(got - expected) <= tolerance))
    return rows


def metrics_against_smi(ours: Mapping[str, GpuMetrics]) -> bool:
    try:
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        print(f"metrics vs nvidia-smi: cannot run nvidia-smi ({e}); not compared")
        return True
    rows = compare(ours, smi)
    print("metrics vs nvidia-smi (tolerances: " + "; ".join(
        f"{c} {t:g} {why}" for c, _, _, t, why in PAIRS) + ")")  # fmt: skip
    print(f"  {'GPU':<42} {'quantity':<40} {'aiodp':>10} {'nvidia-smi':>10}")
    for uuid, column, mine, theirs, ok in rows:
        print(f"  {uuid:<42} {column:<40} {mine:>10} {theirs:>10} {'ok' if ok else 'DIFFERS'}")
    return bool(rows) and all(ok for *_, ok in rows)


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
            readings = await backend.read_metrics()
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
    agree = metrics_against_smi(readings)
    ok = (
        not missing
        and code == 0
        and agree
        and all(p.health.value == "Healthy" for p in probes.values())
    )
    print(f"gpu-check: {'PASS' if ok else 'FAIL'} in {time.monotonic() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
