"""The managed MPS daemon on the fake NVML with a fake `nvidia-cuda-mps-control`: limits set,
EXCLUSIVE_PROCESS, Unhealthy while the daemon is down and Healthy once it answers again, a
removed resource's daemon quit, and the config refused without NVML or the binary."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiodp import app
from aiodp.config import resolve
from aiodp.config.model import Config
from aiodp.gpus.nvml import NvmlBackend
from aiodp.ops.status import Status
from tests import fakemps
from tests.fakenvml import FakeMachine, dgx
from tests.harness import next_update, running, write_atomically

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

RESOURCE = "nvidia.com/gpu"
MPS = (
    "version: v1\nsharing:\n  mps:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"
)


@pytest.fixture
def mps_root(short_dir: Path) -> Iterator[Path]:
    root = short_dir / "mps"
    root.mkdir()
    yield root
    fakemps.kill_all(root)


def options(short_dir: Path, root: Path, machine: FakeMachine, text: str = MPS) -> dict[str, Any]:
    config = short_dir / "config.yaml"
    config.write_text(text)
    return {
        "make_backend": lambda c: NvmlBackend(
            sys_root=c.sys_root, proc_root=c.proc_root, nvml=machine.module()
        ),
        "backend": "nvml",
        "config_file": config,
        "mps_root": root,
        "mps_control": str(fakemps.install(short_dir)),
        "mps_mount_shm": False,
        "health_interval": 0.05,
    }


async def test_mps_daemon_limits_and_recovery(short_dir: Path, mps_root: Path) -> None:
    machine = dgx(2)
    async with running(short_dir, **options(short_dir, mps_root, machine)) as rp:
        first = await next_update(rp.k, lambda u: len(u.devices) == 8)
        assert {d.health for d in first.devices} == {"Healthy"}  # advertised once it answers
        said = fakemps.commands(mps_root, RESOURCE)
        assert said[0] == "get_default_active_thread_percentage"  # nothing to adopt
        assert said[1] == "-d"
        assert said[2:5] == [
            "set_default_device_pinned_mem_limit 0 20389M",  # 81559 MiB / 4 replicas
            "set_default_device_pinned_mem_limit 1 20389M",
            "set_default_active_thread_percentage 25",
        ]
        assert [g.compute_mode for g in machine.gpus] == [3, 3]  # EXCLUSIVE_PROCESS
        assert (mps_root / RESOURCE / "pipe").is_dir()
        assert (mps_root / "shm").is_dir()
        resp = await rp.k.allocate(RESOURCE, [first.devices[0].id])
        assert resp.container_responses[0].envs["CUDA_MPS_PIPE_DIRECTORY"] == (
            "/mps/nvidia.com/gpu/pipe"
        )

        fakemps.kill(mps_root, RESOURCE)  # the daemon dies
        down = await next_update(rp.k, lambda u: all(d.health == "Unhealthy" for d in u.devices))
        assert len(down.devices) == 8
        await next_update(rp.k, lambda u: all(d.health == "Healthy" for d in u.devices))
        said = fakemps.commands(mps_root, RESOURCE)
        assert said.count("-d") == 2  # started again
        assert said.count("set_default_active_thread_percentage 25") == 2  # limits again
        reasons = {d["reason"] for d in rp.state.snapshot()["devices"]}
        assert reasons == {""}


async def test_mps_daemon_is_adopted_and_a_removed_resource_quits(
    short_dir: Path, mps_root: Path
) -> None:
    machine = dgx(2)
    opts = options(short_dir, mps_root, machine)
    async with running(short_dir, **opts) as rp:
        await next_update(rp.k, lambda u: len(u.devices) == 8)
    said = fakemps.commands(mps_root, RESOURCE)
    async with running(short_dir, **opts) as rp:  # a restarted plugin: the daemon lives on
        await next_update(rp.k, lambda u: len(u.devices) == 8)
        again = fakemps.commands(mps_root, RESOURCE)[len(said) :]
        assert "-d" not in again
        assert again[0] == "get_default_active_thread_percentage"
        write_atomically(opts["config_file"], "version: v1\n")  # no more MPS
        await next_update(rp.k, lambda u: len(u.devices) == 2)
        # twice to EXCLUSIVE_PROCESS at the first start, none when adopted, twice back
        assert await asyncio.to_thread(machine.wait_calls, "nvmlDeviceSetComputeMode", 4)
        assert fakemps.commands(mps_root, RESOURCE)[-1] == "quit"
        assert [g.compute_mode for g in machine.gpus] == [0, 0]


async def test_mps_fail_requests_greater_than_one_false_is_honoured(
    short_dir: Path, mps_root: Path
) -> None:
    machine = dgx(2)
    text = MPS.replace("  mps:\n", "  mps:\n    failRequestsGreaterThanOne: false\n")
    async with running(short_dir, **options(short_dir, mps_root, machine, text)) as rp:
        first = await next_update(rp.k, lambda u: len(u.devices) == 8)
        ids = [d.id for d in first.devices[:2]]
        resp = await rp.k.allocate(RESOURCE, ids)
        assert resp.container_responses[0].envs["CUDA_MPS_PIPE_DIRECTORY"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mps_control": "/nonexistent/nvidia-cuda-mps-control"},
         "sharing.mps: the MPS control binary /nonexistent/nvidia-cuda-mps-control is not on PATH"),
        ({"backend": "simulated"},
         "sharing.mps: needs NVML (the simulated backend has no GPUs for an MPS daemon)"),
    ],
)  # fmt: skip
async def test_mps_is_refused_in_one_line_without_what_it_needs(
    short_dir: Path, mps_root: Path, caplog: pytest.LogCaptureFixture,
    change: dict[str, Any], message: str,
) -> None:  # fmt: skip
    opts = options(short_dir, mps_root, dgx(2))
    make = opts.pop("make_backend")
    opts |= change
    devices = short_dir / "devices.yaml"
    devices.write_text("gpus: [{uuid: GPU-a}]\n")
    overrides = {**opts, "simulated_devices": devices, "kubelet_socket": short_dir / "k.sock"}
    config = resolve.build(overrides, resolve.load(opts["config_file"]))
    backend = make(config) if change.get("backend") != "simulated" else None
    assert await app.main(config, backend=backend, status=Status()) == 2
    lines = [r.getMessage() for r in caplog.records if "sharing.mps" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(message)
    assert isinstance(config, Config)


async def test_mps_claim_gets_its_own_daemon_and_it_is_supervised(
    short_dir: Path, mps_root: Path
) -> None:
    """NVIDIA's GpuConfig MPS on a DRA claim: one daemon for the claim with its limits, the
    pipe directory and shm in its CDI spec; the daemon killed turns the claim's GPU Unhealthy
    (the health stream, the slice taint) until it answers again; unprepare quits it."""
    from tests.integration.test_dra import (
        DRIVER,
        NODE,
        claim,
        dra_options,
        prepare,
        register,
        unprepare,
    )  # fmt: skip
    from tests.kubeapi import FakeApi

    machine = dgx(2)
    mps_claim = [{"opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig",
        "sharing": {"strategy": "MPS", "mpsConfig": {
            "defaultActiveThreadPercentage": 50, "defaultPinnedDeviceMemoryLimit": "10Gi"}},
    }}}]  # fmt: skip
    opts = options(short_dir, mps_root, machine, text="version: v1\n")
    async with FakeApi(NODE) as api:
        await api.put_claim(claim("uid-mps", [(NODE, "gpu-1")], mps_claim))
        dra = dra_options(short_dir, api, dra_devices=("1",))
        async with running(short_dir, **{**opts, **dra}) as rp:
            await register(rp)
            answer = (await prepare(rp, "uid-mps")).claims["uid-mps"]
            assert answer.error == ""
            resource = "claim-uid-mps"
            said = fakemps.commands(mps_root, resource)
            assert "-d" in said
            assert "set_default_device_pinned_mem_limit 1 10240M" in said
            assert "set_default_active_thread_percentage 50" in said
            assert machine.gpus[1].compute_mode == 3
            spec = json.loads((short_dir / "cdi" / "aiodp-claim_uid-mps.json").read_text())
            pipe = f"{mps_root}/claim-uid-mps/pipe"
            assert f"CUDA_MPS_PIPE_DIRECTORY={pipe}" in spec["containerEdits"]["env"]
            mounts = {m["containerPath"]: m["hostPath"] for m in spec["containerEdits"]["mounts"]}
            assert mounts == {pipe: pipe, "/dev/shm": f"{mps_root}/shm"}

            fakemps.kill(mps_root, resource)
            await api.wait_slices(
                lambda s: any("taints" in d for sl in s for d in sl["spec"]["devices"])
            )  # the slice shows it (so does the health stream: the same registry)
            (sick,) = [d for sl in api.slices.values() for d in sl["spec"]["devices"]
                       if "taints" in d]  # fmt: skip
            assert sick["name"] == "gpu-1"
            await api.wait_slices(
                lambda s: not any("taints" in d for sl in s for d in sl["spec"]["devices"])
            )  # answering again: Healthy
            assert fakemps.commands(mps_root, resource).count("-d") == 2

            done = (await unprepare(rp, "uid-mps")).claims["uid-mps"]
            assert done.error == ""
            assert fakemps.commands(mps_root, resource)[-1] == "quit"
            assert machine.gpus[1].compute_mode == 0
