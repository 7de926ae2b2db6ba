"""The whole plugin on the fake NVML: XIDs reach the kubelet, recovery, start-up modes."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from aiodp import app
from aiodp.config import Config
from aiodp.fakekubelet import FakeKubelet
from aiodp.nvml import NvmlBackend
from tests import fakenvml
from tests.fakenvml import dgx
from tests.harness import next_update

pytestmark = pytest.mark.integration


def config(directory: Path, **overrides: object) -> Config:
    return dataclasses.replace(
        Config(),
        backend="nvml",
        kubelet_socket=directory / "kubelet.sock",
        health_interval=0.05,
        health_recovery_period=0.2,
        metrics_address="",
        **overrides,  # type: ignore[arg-type]
    )


async def test_nvml_plugin_xid_reaches_the_kubelet_and_recovers(short_dir: Path) -> None:
    machine = dgx(4)
    cfg = config(short_dir)
    stop = asyncio.Event()
    async with FakeKubelet(short_dir) as kubelet, asyncio.TaskGroup() as tg:
        task = tg.create_task(
            app.main(
                cfg,
                backend=NvmlBackend(cfg, nvml=machine.module()),
                stop=stop,
                handle_signals=False,
            )
        )
        first = await next_update(kubelet, lambda u: bool(u.devices))
        assert [d.id for d in first.devices] == [g.uuid for g in machine.gpus]
        machine.inject_xid(2, 79)
        down = await next_update(kubelet, lambda u: any(d.health != "Healthy" for d in u.devices))
        assert [d.id for d in down.devices if d.health != "Healthy"] == [machine.gpus[2].uuid]
        machine.inject_xid(1, 13)  # ignored by default: no change follows
        up = await next_update(kubelet, lambda u: all(d.health == "Healthy" for d in u.devices))
        assert len(up.devices) == 4
        machine.broken = fakenvml.NVML_ERROR_DRIVER_NOT_LOADED  # NVML goes away: fail safe
        await next_update(kubelet, lambda u: all(d.health == "Unhealthy" for d in u.devices))
        machine.broken = None
        await next_update(kubelet, lambda u: all(d.health == "Healthy" for d in u.devices))
        stop.set()
        assert await task == 0


async def test_nvml_plugin_waits_for_nvml_when_told(short_dir: Path) -> None:
    machine = dgx(2)
    machine.init_error = fakenvml.NVML_ERROR_DRIVER_NOT_LOADED
    cfg = config(short_dir, fail_on_init_error=False, register_backoff=(0.01,))
    stop = asyncio.Event()
    async with FakeKubelet(short_dir) as kubelet, asyncio.TaskGroup() as tg:
        task = tg.create_task(
            app.main(
                cfg,
                backend=NvmlBackend(cfg, nvml=machine.module()),
                stop=stop,
                handle_signals=False,
            )
        )
        assert await asyncio.to_thread(machine.wait_calls, "nvmlInit", 3)
        assert kubelet.register_calls == 0
        machine.init_error = None
        reg = await kubelet.registrations.get()
        assert reg.resource == "nvidia.com/gpu"
        stop.set()
        assert await task == 0


async def test_nvml_plugin_init_failure_exits_non_zero(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    machine = dgx(2)
    machine.init_error = fakenvml.NVML_ERROR_LIBRARY_NOT_FOUND
    cfg = config(short_dir)
    code = await app.main(
        cfg, backend=NvmlBackend(cfg, nvml=machine.module()), handle_signals=False
    )
    assert code == 1
    assert (
        "cannot start the device backend: NVML initialisation failed: "
        "NVML Shared Library Not Found" in caplog.text
    )
