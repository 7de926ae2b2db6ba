"""Register against a kubelet.sock that exists before it listens; refusals and fd exhaustion."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from resource import RLIMIT_NOFILE, getrlimit, setrlimit

import grpclib.server
import pytest
from grpclib import GRPCError
from grpclib.const import Status

from aiodp.deviceplugin import registration, server
from aiodp.gen.deviceplugin.v1beta1 import Empty, RegisterRequest, RegistrationBase


class _Kubelet(RegistrationBase):
    def __init__(self, refuse: str | None = None) -> None:
        self.requests: list[RegisterRequest] = []
        self.refuse = refuse

    async def register(self, message: RegisterRequest) -> Empty:
        self.requests.append(message)
        if self.refuse is not None:
            raise GRPCError(Status.UNKNOWN, self.refuse)
        return Empty()


async def register_then_close(
    path: Path,
    srv: grpclib.server.Server,
    sleep: Callable[[float], Awaitable[None]],
    *,
    delays: tuple[float, ...],
) -> None:
    """Register with our retry policy (`sleep` between attempts), then close the kubelet."""
    try:
        await registration.register(
            path, "aiodp-x.sock", "nvidia.com/gpu", server.OPTIONS,
            call_timeout=5, delays=delays, sleep=sleep,
        )  # fmt: skip
    finally:
        srv.close()
        await srv.wait_closed()


async def test_registration_socket_before_listen_is_retried_quickly(short_dir: Path) -> None:
    """The kubelet creates kubelet.sock before listen(): ECONNREFUSED, and no inotify event
    comes when it starts listening. The retry comes after 10 ms, not the 0.5 s backoff."""
    path = short_dir / "kubelet.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))  # bound, not listening yet
    kubelet = _Kubelet()
    srv = grpclib.server.Server([kubelet])
    pauses: list[float] = []

    async def sleep(pause: float) -> None:
        pauses.append(pause)
        if len(pauses) == 1:
            await srv.start(sock=sock)  # the kubelet listens now

    await register_then_close(path, srv, sleep, delays=(0.5,))
    assert pauses == [0.01]
    assert [r.resource_name for r in kubelet.requests] == ["nvidia.com/gpu"]


async def test_registration_refusal_under_fd_exhaustion_says_so(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_dir / "kubelet.sock"
    srv = grpclib.server.Server([_Kubelet(refuse="failed to dial device plugin: EMFILE")])
    await srv.start(path=str(path))
    soft, hard = getrlimit(RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
        setrlimit(RLIMIT_NOFILE, (used + 8, hard))  # the process is at its limit, nearly
        with pytest.raises(GRPCError):
            await registration.register_once(
                path, "aiodp-x.sock", "nvidia.com/gpu", server.OPTIONS, call_timeout=5
            )
    finally:
        setrlimit(RLIMIT_NOFILE, (soft, hard))
        srv.close()
        await srv.wait_closed()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(m.startswith("out of file descriptors:") for m in errors), errors


async def test_registration_refusal_with_fds_to_spare_blames_no_fds(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_dir / "kubelet.sock"
    srv = grpclib.server.Server([_Kubelet(refuse="the ResourceName is invalid")])
    await srv.start(path=str(path))
    try:
        with pytest.raises(GRPCError):
            await registration.register_once(
                path, "aiodp-x.sock", "nvidia.com/gpu", server.OPTIONS, call_timeout=5
            )
    finally:
        srv.close()
        await srv.wait_closed()
    assert "out of file descriptors" not in caplog.text
    assert "kubelet refused registration of nvidia.com/gpu" in caplog.text


async def test_registration_kubelet_hanging_up_mid_call_is_retried(short_dir: Path) -> None:
    """Something on kubelet.sock accepts and hangs up (StreamTerminatedError in grpclib):
    transient, retried; it used to end the plugin."""
    path = short_dir / "kubelet.sock"

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    rude = await asyncio.start_unix_server(hang_up, path=str(path))
    kubelet = _Kubelet()
    srv = grpclib.server.Server([kubelet])
    pauses: list[float] = []

    async def sleep(pause: float) -> None:
        pauses.append(pause)
        rude.close()
        await rude.wait_closed()
        path.unlink(missing_ok=True)
        await srv.start(path=str(path))

    await register_then_close(path, srv, sleep, delays=(0.01,))
    assert len(pauses) == 1  # one backoff wait (jittered), then the real kubelet answered
    assert len(kubelet.requests) == 1
