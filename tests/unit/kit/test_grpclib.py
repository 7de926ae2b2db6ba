"""The fenced grpclib internals: connections we accepted are closed, a missing name is loud."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import grpclib.server
import pytest
from grpclib.client import Channel

import aiodp
from aiodp.deviceplugin import server
from aiodp.gen.deviceplugin import v1beta1 as api
from aiodp.gpus.devices import DeviceRegistry, Resource
from aiodp.kit import _grpclib
from tests.builders import Fixed
from tests.grpcio_stubs import api_pb2, api_pb2_grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame


def service() -> server.DevicePluginService:
    return server.DevicePluginService(Resource("nvidia.com/gpu"), DeviceRegistry(), Fixed)


async def test_grpclib_serve_exit_disconnects_a_connected_client(short_dir: Path) -> None:
    path = short_dir / "p.sock"
    svc = service()
    async with server.serve(svc, path, shutdown_timeout=2):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(PREFACE + SETTINGS)
        await writer.drain()
        assert await reader.read(9)  # the server's SETTINGS: the connection is accepted
    try:
        async with asyncio.timeout(5):
            while await reader.read(65536):  # GOAWAY and then the end of the connection
                pass
    finally:
        writer.close()
    assert reader.at_eof()


async def test_grpclib_serve_exit_disconnects_a_grpcio_channel(short_dir: Path) -> None:
    """A grpcio client (a peer nobody here wrote) sees its connection end: READY -> not."""
    path = short_dir / "p.sock"
    async with grpc.aio.insecure_channel(
        f"unix://{path}", options=[("grpc.default_authority", "localhost")]
    ) as channel:
        async with server.serve(service(), path, shutdown_timeout=2):
            stub = api_pb2_grpc.DevicePluginStub(channel)
            await stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
            assert channel.get_state() is grpc.ChannelConnectivity.READY
        async with asyncio.timeout(5):
            await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
        assert channel.get_state() is not grpc.ChannelConnectivity.READY


async def test_grpclib_factory_not_called_is_an_error(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If grpclib stopped calling `_protocol_factory`, closing would silently do nothing."""
    monkeypatch.setattr(
        _grpclib.Server, "_protocol_factory", grpclib.server.Server._protocol_factory
    )
    path = short_dir / "p.sock"
    channel = Channel(path=str(path))
    try:
        with pytest.raises(_grpclib.GrpclibInternalsChanged, match="_protocol_factory"):
            async with server.serve(service(), path, shutdown_timeout=0.5):
                await api.DevicePluginStub(channel).get_device_plugin_options(api.Empty())
    finally:
        channel.close()


async def test_grpclib_missing_private_name_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    srv = _grpclib.Server([service()])
    monkeypatch.delattr(srv, "_handlers")
    with pytest.raises(_grpclib.GrpclibInternalsChanged, match="_handlers is gone"):
        await srv.wait_requests()


def test_grpclib_private_names_only_in_the_fence() -> None:
    """No other module of ours reaches into grpclib's private names."""
    private = re.compile(r"\.(_protocol_factory|_handlers|processor|_mapping|__gc_step__)\b")
    offenders = []
    root = Path(aiodp.__file__).parent
    for path in sorted(root.rglob("*.py")):
        if path.name == "_grpclib.py" or path.relative_to(root).parts[0] == "gen":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if private.search(line):
                offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert offenders == []


async def test_grpclib_closed_streams_are_bounded_per_connection(short_dir: Path) -> None:
    """h2 remembers 65,536 closed streams per connection by default (~7 MiB on a long-lived
    one); ours remembers 512, so a busy connection's memory stays flat."""
    path = short_dir / "p.sock"
    async with (
        server.serve(service(), path, shutdown_timeout=2) as plugin,
        grpc.aio.insecure_channel(
            f"unix://{path}", options=[("grpc.default_authority", "localhost")]
        ) as channel,
    ):
        stub = api_pb2_grpc.DevicePluginStub(channel)
        for _ in range(1500):
            await stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
        (guard,) = plugin._server.guards
        remembered = guard.inner.connection._connection._closed_streams  # h2's own record
        assert 0 < len(remembered) <= _grpclib.MAX_CLOSED_STREAMS
