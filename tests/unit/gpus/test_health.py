from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from typing import Self

import pytest

from aiodp.gpus import health, topology
from aiodp.gpus.backend import DeviceInfo, GpuMetrics, HealthEvent, Probe
from aiodp.gpus.devices import DeviceRegistry, Health
from aiodp.kit.errors import BackendError
from tests.builders import gpu


class ScriptedBackend:
    """A backend whose probe answers follow a script, one entry per probe."""

    def __init__(self, script: Sequence[Mapping[str, Probe]]) -> None:
        self.script = list(script)
        self.probes = 0
        self.probed = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def discover(self) -> Sequence[DeviceInfo]:
        return []

    async def probe_health(self, ids: Collection[str]) -> Mapping[str, Probe]:
        answer = self.script[min(self.probes, len(self.script) - 1)]
        self.probes += 1
        self.probed.set()
        return answer

    async def health_events(self) -> AsyncGenerator[HealthEvent, None]:
        await asyncio.Event().wait()  # this backend reports through probes only
        yield HealthEvent("", "")  # pragma: no cover

    async def topology(self) -> topology.Topology:
        return topology.Topology()

    async def read_metrics(self) -> Mapping[str, GpuMetrics]:
        return {}

    async def set_compute_mode(self, uuids: Collection[str], exclusive: bool) -> None:
        raise BackendError("a scripted backend has no compute mode")


def registry() -> DeviceRegistry:
    return DeviceRegistry(gpu(i, paths=()) for i in range(2))


OK = Probe(Health.HEALTHY)
BAD = Probe(Health.UNHEALTHY, "GPU is lost")


@pytest.mark.looptime
async def test_health_probe_once_logs_each_transition_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = registry()
    backend = ScriptedBackend([{"GPU-1": BAD}, {"GPU-1": BAD}, {"GPU-1": OK}])
    tracker = health.HealthTracker(reg, recovery_period=0.5)
    for _ in range(3):
        await health.probe_once(backend, tracker)
    await asyncio.sleep(0.5)  # looptime: fake seconds; the period of passing probes
    await health.probe_once(backend, tracker)
    lines = [r.getMessage() for r in caplog.records if r.name == "aiodp.gpus.health"]
    assert lines == [
        "device GPU-1 health Healthy -> Unhealthy (GPU is lost)",
        "device GPU-1 health Unhealthy -> Healthy (was: GPU is lost)",
    ]
    assert [r.levelname for r in caplog.records if r.name == "aiodp.gpus.health"] == [
        "WARNING",
        "INFO",
    ]


@pytest.mark.looptime
async def test_health_polls_every_interval() -> None:
    reg = registry()
    backend = ScriptedBackend([{}, {}, {"GPU-0": BAD}])
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    start = loop.time()
    stream = reg.watch("nvidia.com/gpu")
    await anext(stream)
    async with asyncio.TaskGroup() as tg:
        tracker = health.HealthTracker(reg, recovery_period=300)
        task = tg.create_task(health.run_health(backend, tracker, interval=5, wake=wake))
        devices = await anext(stream)
        task.cancel()
    assert devices[0].health is Health.UNHEALTHY
    assert loop.time() - start == pytest.approx(10)  # the third probe, after two intervals
    await stream.aclose()


@pytest.mark.looptime
async def test_health_wake_probes_at_once() -> None:
    reg = registry()
    backend = ScriptedBackend([{}, {"GPU-1": BAD}])
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tg:
        tracker = health.HealthTracker(reg, recovery_period=300)
        task = tg.create_task(health.run_health(backend, tracker, interval=60, wake=wake))
        await backend.probed.wait()
        start = loop.time()
        backend.probed.clear()
        wake.set()
        await backend.probed.wait()
        task.cancel()
    assert loop.time() - start == 0
    assert reg.get("GPU-1").health is Health.UNHEALTHY  # type: ignore[union-attr]


class FlakyMetrics(ScriptedBackend):
    """Its first metrics reading raises something no backend should (an odd driver answer)."""

    def __init__(self) -> None:
        super().__init__([{}])
        self.reads = 0

    async def read_metrics(self) -> Mapping[str, GpuMetrics]:
        self.reads += 1
        if self.reads == 1:
            raise TypeError("unexpected answer")
        return {"GPU-a": GpuMetrics(power_watts=float(self.reads))}


async def test_device_metrics_survive_a_failed_reading(caplog: pytest.LogCaptureFixture) -> None:
    got: asyncio.Queue[Mapping[str, GpuMetrics]] = asyncio.Queue()
    task = asyncio.create_task(
        health.run_device_metrics(FlakyMetrics(), interval=0, on_reading=got.put_nowait)
    )
    first = await got.get()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert first["GPU-a"].power_watts == 2
    assert "GPU metrics: reading failed" in caplog.text
    assert "unexpected answer" in caplog.text
