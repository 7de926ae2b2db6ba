"""The chaos suite's rows: each an attack or a normal-use run against the rig, bounded in count
and time, sending only to loopback and unix sockets, returning its figure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import h2.config
import h2.connection

from aiodp.deviceplugin.server import varint
from aiodp.kit import metrics
from aiodp.standins.testbed import h100_node, http_get, write_atomically
from tests.chaos.rig import GPU, Rig, plugin_log
from tests.grpcio_stubs import api_pb2, api_pb2_grpc

Row = Callable[[Rig, float], Awaitable[tuple[str, str | None]]]


@dataclass(frozen=True)
class Spec:
    name: str
    run: Row
    full: float
    """The row's size at full scale (restarts, calls, connections, ...)."""


def _n(full: float, scale: float, least: int = 2) -> int:
    return max(least, int(full * scale))


def _ms(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms"


async def _channel(r: Rig) -> grpc.aio.Channel:
    # a connection of its own: grpcio shares subchannels between channels of one target, so
    # a new channel could ride the last one's connection and its cancels (the rapid-reset
    # guard counts them per connection: the stream-churn row's occasional GOAWAY 11)
    return grpc.aio.insecure_channel(
        f"unix://{r.socket}",
        options=[("grpc.default_authority", "localhost"), ("grpc.use_local_subchannel_pool", 1)],
    )


async def restart_storm(r: Rig, n: int, *, down: bool) -> tuple[str, str | None]:
    """n kubelet restarts: sockets deleted and served again at once, or the kubelet down
    for a moment (the plugin waits for kubelet.sock) before it comes back."""
    delays = []
    for _ in range(n):
        t = time.monotonic()
        if down:
            await r.kubelet.stop()
            r.kubelet.clean_directory()
            await asyncio.sleep(0)
            await r.kubelet.start()
        else:
            await r.kubelet.restart()
        async with asyncio.timeout(20):
            reg = await r.kubelet.registrations.get()
        delays.append(reg.at - t)
        await r.next(lambda u: len(u.devices) == 8 and not u.ended)
    return f"{n} restarts, re-registered {_ms(delays)}", None


async def restarts(r: Rig, scale: float) -> tuple[str, str | None]:
    return await restart_storm(r, _n(200, scale), down=False)


async def restarts_down(r: Rig, scale: float) -> tuple[str, str | None]:
    return await restart_storm(r, _n(200, scale), down=True)


async def stream_churn(r: Rig, scale: float) -> tuple[str, str | None]:
    """The kubelet ends our stream n times (each one re-registers); m other clients open and
    drop a ListAndWatch (none re-registers)."""
    n, m = _n(100, scale), _n(1000, scale)
    delays = []
    for _ in range(n):
        t = time.monotonic()
        await r.kubelet.end_stream(GPU)
        async with asyncio.timeout(20):
            reg = await r.kubelet.registrations.get()
        delays.append(reg.at - t)
        await r.next(lambda u: len(u.devices) == 8 and not u.ended)
    # 100 monitors a connection: a cancel of a stream still served counts towards the
    # rapid-reset guard (200 a burst), and a GOAWAY racing a new call is not what this tests
    for start in range(0, m, 100):
        async with await _channel(r) as channel:
            stub = api_pb2_grpc.DevicePluginStub(channel)
            for _ in range(start, min(start + 100, m)):
                call = stub.ListAndWatch(api_pb2.Empty())
                first = await call.read()
                if len(first.devices) != 8:
                    return "", f"a monitor stream got {len(first.devices)} devices"
                call.cancel()
    return f"{n} kubelet stream ends ({_ms(delays)}), {m} monitor streams", None


def _fuzz_body(rnd: random.Random, depth: int = 0) -> bytes:
    if rnd.random() < 0.3:
        return rnd.randbytes(rnd.randrange(0, 64))
    out = b""
    for _ in range(rnd.randrange(0, 5)):
        number, wire = rnd.choice([1, 2, 3, 4, 15, 2047]), rnd.choice([0, 1, 2, 3, 5, 6])
        out += varint(number << 3 | wire)
        if wire == 0:
            out += varint(rnd.randrange(0, 2**64)) if rnd.random() < 0.9 else b"\xff" * 11
        elif wire == 1:
            out += rnd.randbytes(8)
        elif wire == 5:
            out += rnd.randbytes(4)
        elif wire == 2:
            body = (
                _fuzz_body(rnd, depth + 1)
                if depth < 3 and rnd.random() < 0.5
                else rnd.choice([rnd.randbytes(rnd.randrange(20)), b"GPU-" + rnd.randbytes(8)])
            )
            length = len(body) if rnd.random() < 0.9 else rnd.randrange(0, 2**35)
            out += varint(length) + body
    return out


async def fuzz(r: Rig, scale: float) -> tuple[str, str | None]:
    """n fuzzed request bodies to the four unary RPCs (seeded: the same every run)."""
    n = _n(10_000, scale, 50)
    rnd = random.Random(20261201)
    methods = ["GetDevicePluginOptions", "Allocate", "GetPreferredAllocation", "PreStartContainer"]
    codes: Counter[str] = Counter()
    t = time.monotonic()
    async with await _channel(r) as channel:
        calls = {m: channel.unary_unary(f"/v1beta1.DevicePlugin/{m}") for m in methods}
        for _ in range(n):
            call = calls[rnd.choice(methods)]
            try:
                await call(_fuzz_body(rnd), timeout=10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
    took = time.monotonic() - t
    bad = {
        c: k for c, k in codes.items() if c not in ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION")
    }
    figure = f"{n} calls in {took:.1f} s: " + ", ".join(f"{c} {k}" for c, k in codes.most_common())
    return figure, (f"answers {bad}" if bad else None)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
HEADERS = [
    (":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
    (":path", "/v1beta1.DevicePlugin/GetDevicePluginOptions"),
    ("content-type", "application/grpc"), ("te", "trailers"),
]  # fmt: skip


async def _drain(reader: asyncio.StreamReader) -> bool:
    """Read until the server ends the connection; whether it did within 10 s."""
    try:
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True  # reset by the server: closed too
    return True


async def http2_floods(r: Rig, scale: float) -> tuple[str, str | None]:
    """Rapid reset (HEADERS+RST_STREAM), a 16 MB frame announced, idle connections beyond
    the cap: each attacker gets a GOAWAY or is refused; the kubelet's stream carries on."""
    resets, idle = _n(20_000, scale, 500), _n(500, scale, 40)
    path = str(r.socket)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(conn.data_to_send())
    sent = 0
    with contextlib.suppress(ConnectionError):
        for i in range(resets):
            conn.send_headers(1 + 2 * i, HEADERS)
            conn.reset_stream(1 + 2 * i)
            sent += 1
            if i % 100 == 99:
                writer.write(conn.data_to_send())
                await writer.drain()
        writer.write(conn.data_to_send())
    ended = await _drain(reader)
    writer.close()
    if not ended:
        return "", "a rapid-reset connection was not closed"
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(PREFACE + SETTINGS + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"\x00" * 65536)
    ended = await _drain(reader)
    writer.close()
    if not ended:
        return "", "an oversized-frame connection was not closed"
    held = []
    refused = 0
    for _ in range(idle):
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except BlockingIOError:  # the listen backlog is full: refused by the kernel
            refused += 1
            continue
        writer.write(PREFACE + SETTINGS)
        held.append((reader, writer))
    for reader, _ in held:
        if not await _peek_open(reader):
            refused += 1
    for _, writer in held:
        writer.close()
    figure = f"{sent} resets cut off, 16 MB frame refused, {refused} of {idle} idle refused"
    return figure, None if refused >= idle - 32 else f"only {refused} idle connections refused"


async def _peek_open(reader: asyncio.StreamReader) -> bool:
    """Whether the server still holds the connection (it sent SETTINGS and no EOF)."""
    try:
        async with asyncio.timeout(0.5):
            data = await reader.read(9)
    except TimeoutError:
        return True
    except ConnectionError:
        return False
    return bool(data)


async def http_floods(r: Rig, scale: float) -> tuple[str, str | None]:
    """n scrapes of /metrics, then idle connections past the cap, then bad requests."""
    n, idle = _n(3000, scale, 20), _n(200, scale, 70)
    host, _, port = r.address.rpartition(":")
    t = time.monotonic()
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        body = await reader.read()
        writer.close()
        if not body.startswith(b"HTTP/1.1 200"):
            return "", "a scrape failed"
    rate = n / (time.monotonic() - t)
    held = [await asyncio.open_connection(host, int(port)) for _ in range(idle)]
    for _, writer in held:
        writer.write(b"GET /healthz HTTP/1.1\r\nX: " + b"y" * 100_000)  # never finished
    for reader, writer in held:
        with contextlib.suppress(OSError):
            writer.write_eof()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(10):
                await reader.read()
        writer.close()
    return f"{n} scrapes at {rate:.0f}/s, {idle} idle and oversized requests", None


async def _until(check: Callable[[], Awaitable[bool]], within: float = 20) -> float:
    """Poll an outside process's state until `check()` holds; how long it took."""
    t = time.monotonic()
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - another process: nothing to wait on
            await asyncio.sleep(0.01)
    return time.monotonic() - t


async def hostile_files(r: Rig, scale: float) -> tuple[str, str | None]:
    """A YAML bomb and a 100 MB file as the config, aliases and a 900 KB name in the devices
    file: each refused (counted or logged by the plugin), the running state kept."""
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n"
        for i in range(8)
    )

    async def rejected_configs() -> int:
        values = metrics.samples(await http_get(r.address, "/metrics"))
        return int(values.get('aiodp_config_reloads_total{result="rejected"}', 0))

    async def rejected_devices() -> int:
        return plugin_log(r).count("simulated devices: edit rejected")

    cases = [
        ("config: YAML bomb", r.config_file, "version: v1\n" + laughs, rejected_configs),
        ("config: 100 MB", r.config_file, "version: v1\n#" + "x" * (100 << 20), rejected_configs),
        ("devices: aliases", r.devices_file, "x: &x [a]\ngpus: [{uuid: G, name: *x}]\n",
         rejected_devices),
        ("devices: 900 KB name", r.devices_file, "gpus: [{uuid: G, name: " + "n" * 900_000 + "}]\n",
         rejected_devices),
    ]  # fmt: skip
    took = []
    for what, path, text, counter in cases[: max(2, round(len(cases) * min(scale * 10, 1)))]:
        before = await counter()
        tmp = path.with_name("." + path.name + ".tmp")
        await asyncio.to_thread(tmp.write_text, text)
        os.replace(tmp, path)

        async def counted(counter: Callable[[], Awaitable[int]] = counter, b: int = before) -> bool:
            return await counter() > b

        took.append(f"{what} {await _until(counted) * 1000:.0f} ms")
    write_atomically(r.config_file, "version: v1\n")
    write_atomically(r.devices_file, h100_node())
    return "refused: " + ", ".join(took), None


async def signal_storm(r: Rig, scale: float) -> tuple[str, str | None]:
    """n SIGHUPs in a burst: each rediscovers and reloads; nothing re-registers."""
    n = _n(200, scale, 5)
    t = time.monotonic()
    for _ in range(n):
        r.proc.send_signal(signal.SIGHUP)
    status, _ = await _get(r, "/healthz")
    took = time.monotonic() - t
    return f"{n} SIGHUPs, /healthz {status} {took * 1000:.0f} ms after", None


async def _get(r: Rig, path: str) -> tuple[int, str]:
    host, _, port = r.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return int(data.split()[1]), data.partition(b"\r\n\r\n")[2].decode()


async def allocate_run(r: Rig, scale: float) -> tuple[str, str | None]:
    """n Allocate calls (8 at a time) over grpcio, every answer checked."""
    n = _n(100_000, scale, 200)
    ids = [d.id for d in r.kubelet.devices(GPU)]
    wrong = 0
    times: list[float] = []
    t = time.monotonic()
    async with await _channel(r) as channel:
        stub = api_pb2_grpc.DevicePluginStub(channel)

        async def worker(k: int) -> None:
            nonlocal wrong
            for i in range(k, n, 8):
                gpu = ids[i % len(ids)]
                req = api_pb2.AllocateRequest(
                    container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=[gpu])]
                )
                s = time.perf_counter()
                resp = await stub.Allocate(req, timeout=10)
                times.append(time.perf_counter() - s)
                if resp.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] != gpu:
                    wrong += 1

        async with asyncio.TaskGroup() as tg:
            for k in range(8):
                tg.create_task(worker(k))
    rate = n / (time.monotonic() - t)
    return f"{n} calls at {rate:.0f}/s, {_ms(times)}", (f"{wrong} wrong answers" if wrong else None)


ROWS: list[Spec] = [
    Spec("kubelet restarts (sockets re-created)", restarts, 200),
    Spec("kubelet restarts (kubelet down a moment)", restarts_down, 200),
    Spec("stream churn", stream_churn, 1000),
    Spec("fuzzed RPCs", fuzz, 10_000),
    Spec("HTTP/2 floods on the plugin socket", http2_floods, 20_000),
    Spec("HTTP floods on /metrics", http_floods, 3000),
    Spec("hostile files", hostile_files, 4),
    Spec("signal storm", signal_storm, 200),
    Spec("Allocate run", allocate_run, 100_000),
]
