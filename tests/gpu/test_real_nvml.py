"""On a machine with a real NVIDIA GPU (marker gpu; skipped unless NVML initialises)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pynvml
import pytest

from aiodp.config import Config
from aiodp.devices import Health
from aiodp.nvml import NvmlBackend


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
    async with NvmlBackend(Config(backend="nvml")) as backend:
        infos = await backend.discover()
        assert infos, "NVML initialised but reports no GPU"
        for g in infos:
            assert g.uuid.startswith("GPU-")
            assert g.memory_mib > 0
            assert Path(g.paths[0]).exists()
        probes = await backend.probe_health([g.uuid for g in infos])
        assert set(probes) == {g.uuid for g in infos}
        assert all(p.health is Health.HEALTHY for p in probes.values()), probes
        assert "/dev/nvidiactl" in backend.control_paths()


async def test_gpu_event_set_registers() -> None:
    config = dataclasses.replace(Config(backend="nvml"))
    async with NvmlBackend(config) as backend:
        await backend.discover()
        events = backend.health_events()
        await events.aclose()  # start and stop the event thread cleanly
