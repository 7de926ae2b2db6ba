"""The whole plugin on the fake NVML: XIDs reach the kubelet, recovery, start-up modes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aiodp.config.model import Config
from aiodp.gpus.nvml import NvmlBackend
from tests import fakenvml
from tests.fakenvml import FakeMachine, dgx
from tests.harness import next_update, running

pytestmark = pytest.mark.integration


def nvml(machine: FakeMachine) -> Callable[[Config], NvmlBackend]:
    return lambda config: NvmlBackend(
        sys_root=config.sys_root, proc_root=config.proc_root, nvml=machine.module()
    )


FAST: dict[str, Any] = {"backend": "nvml", "health_interval": 0.05, "health_recovery_period": 0.2}


async def test_nvml_plugin_xid_reaches_the_kubelet_and_recovers(short_dir: Path) -> None:
    machine = dgx(4)
    async with running(short_dir, make_backend=nvml(machine), **FAST) as rp:
        kubelet = rp.k
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


async def test_nvml_plugin_waits_for_nvml_when_told(short_dir: Path) -> None:
    machine = dgx(2)
    machine.init_error = fakenvml.NVML_ERROR_DRIVER_NOT_LOADED
    async with running(
        short_dir,
        make_backend=nvml(machine),
        fail_on_init_error=False,
        register_backoff=(0.01,),
        **FAST,
    ) as rp:
        assert await asyncio.to_thread(machine.wait_calls, "nvmlInit", 3)
        assert rp.k.register_calls == 0
        machine.init_error = None
        reg = await rp.k.registrations.get()
        assert reg.resource == "nvidia.com/gpu"


async def test_nvml_plugin_init_failure_exits_non_zero(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    machine = dgx(2)
    machine.init_error = fakenvml.NVML_ERROR_LIBRARY_NOT_FOUND
    async with running(short_dir, make_backend=nvml(machine), expect_code=1, **FAST) as rp:
        await rp.task  # it ends by itself
    assert (
        "cannot start the device backend: NVML initialisation failed: "
        "NVML Shared Library Not Found" in caplog.text
    )
