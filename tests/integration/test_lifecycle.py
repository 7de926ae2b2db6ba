"""The plugin against the kubelet stand-in over real unix sockets: the lifecycle contract."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import psutil
import pytest

from aiodp.config.model import RESOURCE_GPU, Config
from aiodp.gpus.simulated import SimulatedBackend
from aiodp.standins.kubelet import FakeKubelet
from tests.harness import h100_node, next_update, running, write_atomically

pytestmark = pytest.mark.integration


async def test_lifecycle_registration_contents(short_dir: Path) -> None:
    async with running(short_dir) as rp:
        reg = await rp.k.registrations.get()
        assert reg.resource == "nvidia.com/gpu"
        assert reg.endpoint == "aiodp-nvidia-gpu.sock"  # a plain file name, not a path
        assert reg.options.get_preferred_allocation_available is True
        assert reg.options.pre_start_required is False
        assert (short_dir / reg.endpoint).is_socket()


async def test_lifecycle_first_snapshot_lists_every_gpu_with_numa(short_dir: Path) -> None:
    async with running(short_dir) as rp:
        update = await next_update(rp.k, lambda u: bool(u.devices))
        assert len(update.devices) == 8
        assert {d.health for d in update.devices} == {"Healthy"}
        numa = [d.topology.nodes[0].id for d in update.devices if d.topology]
        assert numa == [0, 0, 0, 0, 1, 1, 1, 1]
        assert len({d.id for d in update.devices}) == 8


async def test_lifecycle_health_flip_and_recovery_reach_the_stream(short_dir: Path) -> None:
    async with running(short_dir) as rp:
        first = await next_update(rp.k, lambda u: bool(u.devices))
        sick = first.devices[3].id
        write_atomically(rp.devices_file, h100_node({3: "XID 79"}))
        down = await next_update(rp.k, lambda u: any(d.health == "Unhealthy" for d in u.devices))
        assert [d.id for d in down.devices if d.health == "Unhealthy"] == [sick]
        # write in place (an editor that truncates and rewrites) brings it back
        rp.devices_file.write_text(h100_node())
        up = await next_update(rp.k, lambda u: all(d.health == "Healthy" for d in u.devices))
        assert len(up.devices) == 8


async def test_lifecycle_bad_edit_keeps_the_last_good_list(short_dir: Path) -> None:
    async with running(short_dir) as rp:
        await next_update(rp.k, lambda u: bool(u.devices))
        write_atomically(rp.devices_file, "gpus: [{uuid: a}, {uuid: a}]\n")
        write_atomically(rp.devices_file, "gpus: [: not yaml\n")
        write_atomically(rp.devices_file, h100_node({1: "after bad edits"}))
        up = await next_update(rp.k, lambda u: any(d.health == "Unhealthy" for d in u.devices))
        assert len(up.devices) == 8  # the duplicate-UUID list never reached the kubelet
        assert rp.state.registrations == 1


async def test_lifecycle_kubelet_restarts_twenty_times_one_registration_each(
    short_dir: Path,
) -> None:
    proc = psutil.Process()
    async with running(short_dir) as rp:
        await rp.k.registrations.get()
        await next_update(rp.k, lambda u: bool(u.devices))
        fds = proc.num_fds()
        tasks = len(asyncio.all_tasks())
        for i in range(20):
            await rp.k.restart()
            reg = await rp.k.registrations.get()
            assert reg.resource == RESOURCE_GPU
            await next_update(rp.k, lambda u: bool(u.devices) and not u.ended)
            assert rp.k.registrations.empty(), f"restart {i}: registered twice"
        assert rp.state.registrations == 21
        assert rp.k.register_calls == 21
        assert proc.num_fds() <= fds + 2
        assert len(asyncio.all_tasks()) <= tasks


async def test_lifecycle_kubelet_that_appears_later(short_dir: Path) -> None:
    async with running(short_dir, kubelet=False) as rp:
        assert not (short_dir / "aiodp-nvidia-gpu.sock").exists()
        async with FakeKubelet(short_dir) as kubelet:
            reg = await kubelet.registrations.get()
            assert reg.resource == RESOURCE_GPU
            await next_update(kubelet, lambda u: bool(u.devices))
            await rp.ready.wait()
            assert rp.state.registrations == 1


async def test_lifecycle_stale_kubelet_socket_then_real_kubelet(short_dir: Path) -> None:
    """kubelet.sock exists but nobody listens: retries back off, then a real one is used."""
    async with FakeKubelet(short_dir) as dead:
        await dead.stop()  # leaves kubelet.sock behind, like a crashed kubelet
    async with running(short_dir, kubelet=False) as rp, FakeKubelet(short_dir) as kubelet:
        await kubelet.registrations.get()
        await rp.ready.wait()
        assert rp.state.registrations == 1


async def test_lifecycle_refused_registration_is_retried_with_backoff(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(
        short_dir,
        kubelet_options={"reject": "simulated refusal"},
        register_backoff=(0.05, 0.1),
    ) as rp:
        await rp.k.wait_register_calls(3)
        rp.k.reject = None
        reg = await rp.k.registrations.get()
        assert reg.resource == RESOURCE_GPU
    assert "simulated refusal" in caplog.text
    assert "attempt #1 failed; retrying in" in caplog.text


async def test_lifecycle_kubelet_side_stream_end_leads_to_reregistration(short_dir: Path) -> None:
    async with running(short_dir) as rp:
        await rp.k.registrations.get()
        await next_update(rp.k, lambda u: bool(u.devices))
        await rp.k.end_stream(RESOURCE_GPU)
        reg = await rp.k.registrations.get()
        assert reg.resource == RESOURCE_GPU
        assert "the kubelet ended ListAndWatch" in rp.state.reasons


async def test_lifecycle_our_socket_deleted_leads_to_new_generation(short_dir: Path) -> None:
    async with running(short_dir) as rp:
        reg = await rp.k.registrations.get()
        (short_dir / reg.endpoint).unlink()
        await rp.k.registrations.get()
        assert (short_dir / reg.endpoint).is_socket()
        assert rp.state.reasons[0] == "our socket was removed"


async def test_lifecycle_slow_dial_back_does_not_block_registration(short_dir: Path) -> None:
    async with running(short_dir, kubelet_options={"dial_delay": 2.0}) as rp:
        reg = await rp.k.registrations.get()
        assert reg.resource == RESOURCE_GPU
        await rp.ready.wait()
        assert rp.state.registrations == 1


async def test_lifecycle_stop_removes_our_socket_keeps_the_kubelets(short_dir: Path) -> None:
    (short_dir / "kubelet_internal_checkpoint").write_text("{}")
    async with FakeKubelet(short_dir) as kubelet:
        async with running(short_dir, kubelet=False):
            await kubelet.registrations.get()
            assert (short_dir / "aiodp-nvidia-gpu.sock").is_socket()
        # the plugin stopped, the kubelet runs on (on Python 3.13 a stopping asyncio unix
        # server removes its own socket: so look while the stand-in still serves)
        assert not (short_dir / "aiodp-nvidia-gpu.sock").exists()
        assert (short_dir / "kubelet.sock").is_socket()
    assert (short_dir / "kubelet_internal_checkpoint").read_text() == "{}"


async def test_lifecycle_garbage_on_our_socket_does_not_disturb(short_dir: Path) -> None:
    async with running(short_dir) as rp:
        reg = await rp.k.registrations.get()
        path = str(short_dir / reg.endpoint)
        for junk in (os.urandom(4096), b"PRI * HTTP/2.0\r\n\r\nSM", b"\x00" * 9):
            _reader, writer = await asyncio.open_unix_connection(path)
            writer.write(junk)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        resp = await rp.k.allocate(RESOURCE_GPU, [rp.k.devices(RESOURCE_GPU)[0].id])
        assert len(resp.container_responses) == 1
        assert rp.state.registrations == 1


async def test_lifecycle_stream_never_opened_leads_to_reregistration(short_dir: Path) -> None:
    async with running(
        short_dir, kubelet_options={"open_streams": False}, stream_open_timeout=0.2
    ) as rp:
        await rp.k.registrations.get()
        await rp.k.registrations.get()
        assert rp.state.reasons[0] == "the kubelet never opened ListAndWatch"


@pytest.mark.parametrize(
    ("version", "resource", "message"),
    [
        ("v1alpha", "nvidia.com/gpu", 'requested API version "v1alpha" is not supported'),
        ("v1beta1", "gpu", 'the ResourceName "gpu" is invalid'),
    ],
)
async def test_lifecycle_stand_in_refuses_like_the_kubelet(
    short_dir: Path, version: str, resource: str, message: str
) -> None:
    from grpclib import GRPCError
    from grpclib.client import Channel
    from grpclib.const import Status

    from aiodp.gen.deviceplugin.v1beta1 import RegisterRequest, RegistrationStub

    async with FakeKubelet(short_dir) as kubelet:
        channel = Channel(path=str(kubelet.socket))
        try:
            with pytest.raises(GRPCError) as err:
                await RegistrationStub(channel).register(
                    RegisterRequest(version=version, endpoint="x.sock", resource_name=resource)
                )
        finally:
            channel.close()
    assert err.value.status is Status.UNKNOWN
    assert message in (err.value.message or "")


class _HangingExit(SimulatedBackend):
    """A backend whose shutdown never ends (a stuck NVML event thread, say)."""

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.Event().wait()


async def test_lifecycle_backend_exit_is_bounded(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def hanging(config: Config) -> SimulatedBackend:
        assert config.simulated_devices is not None
        return _HangingExit(config.simulated_devices)

    async with running(short_dir, make_backend=hanging, shutdown_timeout=0.2) as rp:
        await rp.ready.wait()
    assert "the device backend did not shut down within 0.2 s" in caplog.text


async def test_lifecycle_stream_end_is_a_warning_only_when_the_kubelet_stayed_up(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(short_dir) as rp:
        await rp.k.registrations.get()
        await next_update(rp.k, lambda u: bool(u.devices))
        await rp.k.restart()  # a normal kubelet restart: INFO only
        await rp.k.registrations.get()
        await next_update(rp.k, lambda u: bool(u.devices) and not u.ended)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == []
        await rp.k.end_stream(RESOURCE_GPU)  # the kubelet stays up and drops us: WARNING
        await rp.k.registrations.get()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "the kubelet ended ListAndWatch for nvidia.com/gpu while it stayed up; registering again"
    ]


async def test_lifecycle_start_up_line_is_short(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One short INFO line at start (it listed all 60 settings, ~1,850 characters); the full
    list is at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="aiodp.app")
    async with running(short_dir) as rp:
        await rp.ready.wait()
    info = [
        r.getMessage()
        for r in caplog.records
        if r.name == "aiodp.app" and "starting" in r.getMessage()
    ]
    assert len(info) == 1
    assert len(info[0]) < 300
    assert "backend=simulated" in info[0]
    debug = [
        r for r in caplog.records if r.levelno == logging.DEBUG and "running with" in r.getMessage()
    ]
    assert len(debug) == 1
    assert "health_interval=5.0 (default)" in debug[0].getMessage()


async def test_lifecycle_says_at_start_when_it_cannot_make_sockets(
    short_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As non-root it waited quietly for a kubelet socket it could never answer: now one
    ERROR line at start (here os.access says no; root still binds, so it goes on)."""
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == short_dir else real(p, mode)
    )
    async with running(short_dir) as rp:
        await rp.ready.wait()
    lines = [r for r in caplog.records if "cannot create our sockets in" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.ERROR
