"""On a machine with a real NVIDIA GPU (marker gpu; skipped unless NVML initialises)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pynvml
import pytest

from aiodp.gpus.backend import control_paths
from aiodp.gpus.devices import Health
from aiodp.gpus.nvml import NvmlBackend


def _nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _nvml_works(), reason="NVML does not initialise here (no GPU)"),
]


async def test_gpu_discovery_and_probe() -> None:
    async with NvmlBackend() as backend:
        infos = await backend.discover()
        assert infos, "NVML initialised but reports no GPU"
        for g in infos:
            assert g.uuid.startswith("GPU-")
            assert g.memory_mib > 0
            assert Path(g.paths[0]).exists()
        probes = await backend.probe_health([g.uuid for g in infos])
        assert set(probes) == {g.uuid for g in infos}
        assert all(p.health is Health.HEALTHY for p in probes.values()), probes
        assert "/dev/nvidiactl" in control_paths(Path("/"))


async def test_gpu_xid_events_register_and_stay_quiet() -> None:
    """The event thread registers every GPU and waits; a failed registration or wait would
    come out as an event, so a quiet 2.5 s (over two 1 s waits) means it works."""
    async with NvmlBackend() as backend:
        await backend.discover()
        events = backend.health_events()
        try:
            quiet = False
            try:
                async with asyncio.timeout(2.5):
                    event = await anext(events)
            except TimeoutError:
                quiet = True
            assert quiet, f"unexpected health event on a healthy GPU: {event}"
        finally:
            await events.aclose()  # stops the event thread


async def test_gpu_metrics_read_in_their_units() -> None:
    async with NvmlBackend() as b:
        infos = await b.discover()
        reading = await b.read_metrics()
    assert set(reading) == {g.uuid for g in infos}
    for g in infos:
        m = reading[g.uuid]
        assert m.memory_total_bytes is not None
        assert abs(m.memory_total_bytes / 2**20 - g.memory_mib) <= 1024
        assert m.temperature_celsius is not None
        assert 0 < m.temperature_celsius < 110
        if m.power_watts is not None:
            assert 0 < m.power_watts < 2000  # watts, not milliwatts
        if m.sm_clock_hertz is not None:
            assert 1e8 < m.sm_clock_hertz < 5e9  # hertz, not MHz


async def test_gpu_feature_discovery_labels_from_real_discovery() -> None:
    from aiodp.config.model import Config
    from aiodp.gpus import labels

    async with NvmlBackend() as backend:
        infos = await backend.discover()
    got = labels.labels(infos, Config(), machine="gpu-check", timestamp=1)
    assert got["nvidia.com/gpu.count"] == str(len(infos))
    assert got["nvidia.com/gpu.mode"] in ("compute", "graphics")
    assert got["nvidia.com/cuda.driver-version.full"].count(".") >= 1
    assert got["nvidia.com/gpu.family"] != "undefined"
    print({k: v for k, v in sorted(got.items())})  # noqa: T201 - the note quotes them


@pytest.mark.skipif(
    __import__("shutil").which("nvidia-cuda-mps-control") is None,
    reason="no nvidia-cuda-mps-control here",
)
async def test_gpu_mps_daemon_round(tmp_path: Path) -> None:
    """The real control binary: EXCLUSIVE_PROCESS, the daemon started with its limits,
    answering, then quit and the compute mode put back."""
    from aiodp.gpus import mps

    async with NvmlBackend() as backend:
        infos = await backend.discover()
        g = infos[0]
        spec = mps.DaemonSpec("nvidia.com/gpu", tmp_path, ((g.index, g.uuid, g.memory_mib),), 2)
        control = mps.Control("nvidia-cuda-mps-control", spec)
        spec.pipe_dir.mkdir(parents=True)
        spec.log_dir.mkdir(parents=True)
        await backend.set_compute_mode([g.uuid], exclusive=True)
        try:
            await control.start()
            for command in spec.defaults():
                await control.send(command)
            assert float(await control.send(mps.PROBE)) == 50.0
        finally:
            await control.quit()
            await backend.set_compute_mode([g.uuid], exclusive=False)


@pytest.mark.skipif(__import__("shutil").which("nvidia-smi") is None, reason="no nvidia-smi")
async def test_gpu_time_slice_set_and_put_back() -> None:
    """A DRA claim's TimeSlicing interval, as the preparer sets it: Long, then Default."""
    from aiodp.dra import prepared

    async with NvmlBackend() as backend:
        uuid = (await backend.discover())[0].uuid
    for value in ("3", "0"):
        why = await prepared._run(["nvidia-smi", "compute-policy", "-i", uuid,
                                   "--set-timeslice", value])  # fmt: skip
        assert why == ""
