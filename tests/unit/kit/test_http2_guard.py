"""HTTP/2 abuse against a plugin socket, run for real over raw unix connections.

Each attack ends the attacker's connection with a GOAWAY (or refuses it), and a well-behaved
client on its own connection is answered throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from aiodp.deviceplugin import server
from aiodp.gpus.devices import DeviceRegistry, Resource
from aiodp.kit import _grpclib
from tests.builders import Fixed
from tests.grpcio_stubs import api_pb2, api_pb2_grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/v1beta1.DevicePlugin/GetDevicePluginOptions"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def service() -> server.DevicePluginService:
    return server.DevicePluginService(Resource("nvidia.com/gpu"), DeviceRegistry(), Fixed)


@pytest.fixture
async def plugin(short_dir: Path) -> AsyncIterator[server.PluginServer]:
    limits = _grpclib.Limits(idle_timeout=0.3, max_connections=4)
    async with server.serve(
        service(), short_dir / "p.sock", shutdown_timeout=1, limits=limits
    ) as handle:
        yield handle


async def connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path))


async def goaway_code(reader: asyncio.StreamReader) -> int | None:
    """Read frames until the connection ends; the last GOAWAY's error code, if any."""
    code = None
    async with asyncio.timeout(5):
        while True:
            try:
                head = await reader.readexactly(9)
                body = await reader.readexactly(int.from_bytes(head[:3], "big"))
            except asyncio.IncompleteReadError:
                return code
            if head[3] == 0x7:
                code = int.from_bytes(body[4:8], "big")


async def answers(path: Path) -> None:
    """A well-behaved grpcio client on its own connection gets its answer."""
    async with grpc.aio.insecure_channel(
        f"unix://{path}", options=[("grpc.default_authority", "localhost")]
    ) as channel:
        stub = api_pb2_grpc.DevicePluginStub(channel)
        opts = await stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
        assert opts.get_preferred_allocation_available


async def test_guard_socket_is_private(plugin: server.PluginServer) -> None:
    assert plugin.path.stat().st_mode & 0o777 == 0o600


async def test_guard_oversized_frame_gets_goaway_before_buffering(
    plugin: server.PluginServer,
) -> None:
    reader, writer = await connect(plugin.path)
    # announces a 16 MB DATA frame on stream 1, then starts sending it
    writer.write(PREFACE + SETTINGS + (0xFFFFFF).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01")
    writer.write(b"\x00" * 65536)
    assert await goaway_code(reader) == _grpclib.FRAME_SIZE_ERROR
    writer.close()
    await answers(plugin.path)


async def test_guard_rapid_reset_gets_goaway(plugin: server.PluginServer) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    reader, writer = await connect(plugin.path)
    writer.write(conn.data_to_send())
    for i in range(2000):
        stream = 1 + 2 * i
        conn.send_headers(stream, HEADERS)
        conn.reset_stream(stream)
    writer.write(conn.data_to_send())
    assert await goaway_code(reader) == _grpclib.ENHANCE_YOUR_CALM
    writer.close()
    await answers(plugin.path)


async def test_guard_oversized_message_gets_goaway(
    plugin: server.PluginServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A 5 MiB request, sent as flow control allows (grpclib keeps opening the window as it
    reads a message of any announced size): the connection ends at 4 MiB."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, HEADERS)
    reader, writer = await connect(plugin.path)
    writer.write(conn.data_to_send())
    prefix = b"\x00" + (5 << 20).to_bytes(4, "big")  # a gRPC message of 5 MiB follows
    conn.send_data(1, prefix)
    sent, code = 0, None
    with contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
        async with asyncio.timeout(10):
            while code is None:
                window = min(conn.local_flow_control_window(1), conn.max_outbound_frame_size)
                if window > 0 and sent < 6 << 20:
                    conn.send_data(1, b"\x00" * window)
                    sent += window
                    writer.write(conn.data_to_send())
                    await writer.drain()
                    continue
                chunk = await reader.read(65536)
                if not chunk:
                    break
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        code = event.error_code
                writer.write(conn.data_to_send())
    writer.close()
    # the GOAWAY is sent, but our writes may fail first when the server hangs up
    assert code in (_grpclib.ENHANCE_YOUR_CALM, None)
    assert "closing a connection that sent over 4194304 bytes on one stream" in caplog.text
    assert 4 << 20 <= sent < 6 << 20


async def test_guard_idle_connection_is_closed(plugin: server.PluginServer) -> None:
    reader, writer = await connect(plugin.path)
    writer.write(PREFACE + SETTINGS)  # then silence
    assert await goaway_code(reader) == _grpclib.NO_ERROR
    writer.close()
    assert plugin.connections == 0


async def test_guard_connections_are_capped(plugin: server.PluginServer) -> None:
    held = [await connect(plugin.path) for _ in range(4)]
    for _, w in held:
        w.write(PREFACE + SETTINGS)
    extra_reader, extra_writer = await connect(plugin.path)
    async with asyncio.timeout(5):
        assert await extra_reader.read() == b""  # refused at once
    extra_writer.close()
    for _, w in held:
        w.close()


async def test_guard_resets_of_answered_streams_do_not_count(
    plugin: server.PluginServer,
) -> None:
    """A client that resets each stream after its answer (tidying up, as some do) is a
    normal client: 400 such resets in a row do not get it cut off."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    reader, writer = await connect(plugin.path)
    writer.write(conn.data_to_send())
    empty = b"\x00\x00\x00\x00\x00"  # a gRPC message: not compressed, 0 bytes (Empty)
    for i in range(400):
        stream = 1 + 2 * i
        conn.send_headers(stream, HEADERS)
        conn.send_data(stream, empty, end_stream=True)
        writer.write(conn.data_to_send())
        ended = False
        async with asyncio.timeout(5):
            while not ended:
                chunk = await reader.read(65536)
                assert chunk, f"the connection was closed after {i} calls"
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                        ended = True
                writer.write(conn.data_to_send())
        rst = b"\x00\x00\x04\x03\x00" + stream.to_bytes(4, "big") + b"\x00\x00\x00\x08"
        writer.write(rst)  # RST_STREAM(CANCEL) of a stream already answered
    assert plugin.connections == 1
    writer.close()
