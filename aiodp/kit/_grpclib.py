"""Where grpclib needs help, in one place: closing accepted connections and guarding them.

1. grpclib's `Server.close()` stops listening and cancels handlers but leaves accepted client
   connections open (grpclib PR #190), so a peer that keeps its connection (the kubelet does)
   would hold it, and our old generation, forever. `Server` records every connection it
   accepts (by overriding the private `_protocol_factory`) and closes them itself, and waits
   for the handlers' request tasks (the private `_handlers` and their `_tasks`).
2. grpclib and h2 bound nothing a peer sends (the upstream patch is in `patches/`):
   h2 buffers a whole frame before it checks its announced length (16 MB per connection),
   cancelled streams pile up under a rapid HEADERS+RST_STREAM flood, a connection that says
   nothing holds its file descriptor forever, and a message may be any size. `_Guard` wraps
   each connection's protocol and reads the frame headers as they arrive (9 bytes each,
   before h2 buffers anything): an oversized frame, a reset flood, too much DATA on a stream
   or too many connections end that connection with a GOAWAY; a connection with no stream
   is closed after `idle_timeout`. The kubelet's one connection never comes near a limit.
3. Which connection a request came on (`current_connection()`): the kubelet dials us back
   inside Register and opens its ListAndWatch on that same connection, so that stream,
   and only that one, is the kubelet's.

Every private name is checked when the server starts and when it is used: after a grpclib
upgrade that renames one, this raises `GrpclibInternalsChanged` instead of silently doing
nothing. No other module touches a private grpclib name.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final, cast

import grpclib.server
import h2.connection
from grpclib.encoding.base import CodecBase
from grpclib.protocol import H2Protocol

log = logging.getLogger(__name__)

TESTED_WITH: Final = "0.4.9"

PREFACE_LEN: Final = 24
"""b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n": what a client sends before its first frame."""
DATA, HEADERS, RST_STREAM = 0x0, 0x1, 0x3
END_STREAM: Final = 0x1
NO_ERROR, PROTOCOL_ERROR, FRAME_SIZE_ERROR, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x6, 0xB

_CONNECTION: contextvars.ContextVar[object] = contextvars.ContextVar("aiodp_connection")


class GrpclibInternalsChanged(RuntimeError):
    """A private grpclib name this module relies on is gone: update `_grpclib.py`."""


def _require(obj: object, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise GrpclibInternalsChanged(
            f"grpclib {grpclib.__version__}: {type(obj).__name__}.{name} is gone "
            f"(aiodp's _grpclib.py was written against grpclib {TESTED_WITH})"
        ) from None


def _check_classes() -> None:
    """The names we rely on exist on grpclib's classes (checked once, at import)."""
    if "processor" not in getattr(H2Protocol, "__annotations__", {}):
        raise GrpclibInternalsChanged("grpclib H2Protocol no longer declares `processor`")
    _require(grpclib.server.Server, "_protocol_factory")


_check_classes()

MAX_CLOSED_STREAMS: Final = 512
"""Closed streams h2 remembers per connection (to tell a late frame from a bad one). h2 keeps
65,536 by default, ~100 bytes each: a long-lived connection grew by 7 MiB over 65k calls,
and 32 busy connections could pass the chart's 192 MiB. The kubelet's calls are sequential:
a frame late by 512 streams does not happen."""
h2.connection.H2Connection.MAX_CLOSED_STREAMS = MAX_CLOSED_STREAMS


def current_connection() -> object | None:
    """The connection the running request arrived on (inside a handler), else None."""
    return _CONNECTION.get(None)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one server accepts from its peers; far above what the kubelet ever does."""

    max_connections: int = 32
    """Open connections at once; the kubelet uses one, the plugin watcher one more."""
    idle_timeout: float = 60.0
    """A connection with no open stream is closed after this many seconds."""
    max_frame_size: int = 16384
    """The largest frame accepted: h2's SETTINGS_MAX_FRAME_SIZE, which it advertises."""
    max_message_bytes: int = 4 << 20
    """DATA bytes one request stream may send (grpc-go's default receive limit)."""
    max_resets: int = 200
    """Streams a connection may cancel while we still serve them, in a burst..."""
    resets_per_second: float = 20.0
    """...refilled at this rate: a rapid reset (CVE-2023-44487) gets a GOAWAY. A reset of a
    stream already answered (clients tidy up so) does not count."""
    max_streams: int = 1000
    """Request streams with DATA still coming, per connection."""


class _Frames:
    """Reads HTTP/2 frame headers as bytes arrive; says what breaks a limit, if anything."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.last_stream = 0
        self._preface = PREFACE_LEN
        self._head = b""
        self._body = 0
        self._tokens = float(limits.max_resets)
        self._refilled = now
        self._data: dict[int, int] = {}
        self.resets: list[tuple[int, int]] = []
        """RST_STREAM frames in the last `feed()`: (offset in its data, stream id)."""

    def reset_in_flight(self, now: float) -> bool:
        """Count the peer cancelling a stream we were still serving; False once that
        happened more than `max_resets` times in a burst (`resets_per_second` refill)."""
        limits = self.limits
        self._tokens = min(
            float(limits.max_resets),
            self._tokens + (now - self._refilled) * limits.resets_per_second,
        )
        self._refilled = now
        self._tokens -= 1
        return self._tokens >= 0

    def feed(self, data: bytes, now: float) -> tuple[int, str] | None:
        """Account for `data`; (GOAWAY error code, reason) when the peer broke a limit.

        The offsets of RST_STREAM frames in `data` are left in `resets` as (offset, stream):
        whether a reset counts depends on whether its stream is still being served.
        """
        self.resets = []
        i, n = 0, len(data)
        if self._preface:
            take = min(self._preface, n)
            self._preface -= take
            i = take
        while i < n:
            if self._body:
                take = min(self._body, n - i)
                self._body -= take
                i += take
                continue
            need = 9 - len(self._head)
            self._head += data[i : i + need]
            i += need
            if len(self._head) < 9:
                break
            head, self._head = self._head, b""
            if head[3] == RST_STREAM:
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                self.resets.append((max(i - 9, 0), stream))
            problem = self._frame(head, now)
            if problem is not None:
                return problem
        return None

    def _frame(self, head: bytes, now: float) -> tuple[int, str] | None:
        length = int.from_bytes(head[:3], "big")
        kind, flags = head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        limits = self.limits
        if length > limits.max_frame_size:
            return FRAME_SIZE_ERROR, f"a frame of {length} bytes (at most {limits.max_frame_size})"
        self._body = length
        if kind == HEADERS:
            self.last_stream = max(self.last_stream, stream)
        elif kind == RST_STREAM:
            self._data.pop(stream, None)
        elif kind == DATA and stream:
            sent = self._data.get(stream, 0) + length
            if sent > limits.max_message_bytes:
                return ENHANCE_YOUR_CALM, f"over {limits.max_message_bytes} bytes on one stream"
            if flags & END_STREAM:
                self._data.pop(stream, None)
            else:
                self._data[stream] = sent
                if len(self._data) > limits.max_streams:
                    return ENHANCE_YOUR_CALM, "too many unfinished request streams"
        return None


def goaway(last_stream: int, code: int) -> bytes:
    """An HTTP/2 GOAWAY frame (RFC 9113 §6.8)."""
    payload = last_stream.to_bytes(4, "big") + code.to_bytes(4, "big")
    return len(payload).to_bytes(3, "big") + b"\x07\x00" + b"\x00\x00\x00\x00" + payload


class _Guard(asyncio.Protocol):
    """One accepted connection: grpclib's protocol inside, the limits around it."""

    def __init__(self, inner: H2Protocol, server: Server) -> None:
        self.inner = inner
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._frames = _Frames(server.limits, self._loop.time())
        self._last_active = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        if len(self.server.guards) >= self.server.limits.max_connections:
            self.server.refused += 1
            if self.server.refused == 1 or self.server.refused % 1000 == 0:
                log.warning(
                    "refusing connections beyond %d (%d refused so far)",
                    self.server.limits.max_connections,
                    self.server.refused,
                )
            self.transport.abort()
            return
        self._admitted = True
        self.server.guards.add(self)
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.closed or not self._admitted:
            return
        now = self._loop.time()
        self._last_active = now
        problem = self._frames.feed(data, now)
        if problem is not None:
            code, reason = problem
            log.warning("closing a connection that sent %s", reason)
            self.close(code)
            return
        token = _CONNECTION.set(self)
        try:
            done = 0
            for offset, stream in self._frames.resets:
                # feed up to the reset, then see whether it cancels work in flight (a rapid
                # reset); a reset of a stream already answered is a client's normal tidy-up
                if offset > done:
                    self.inner.data_received(data[done:offset])
                    done = offset
                if stream in self._streams() and not self._frames.reset_in_flight(now):
                    log.warning("closing a connection that sent a flood of stream resets")
                    self.close(ENHANCE_YOUR_CALM)
                    return
            if done < len(data) and not self.closed:
                self.inner.data_received(data[done:] if done else data)
        finally:
            _CONNECTION.reset(token)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self._admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._admitted:
            self.server.guards.discard(self)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self.inner.resume_writing()

    def _streams(self) -> dict[int, Any]:
        """grpclib's streams being served on this connection, by stream id."""
        processor = getattr(self.inner, "processor", None)  # set by connection_made
        return _require(processor, "streams") if processor is not None else {}

    def open_streams(self) -> int:
        return len(self._streams())

    def _arm(self) -> None:
        self._timer = self._loop.call_at(
            self._last_active + self.server.limits.idle_timeout, self._check_idle
        )

    def _check_idle(self) -> None:
        if self.closed:
            return
        if self.open_streams() == 0 and self._loop.time() >= (
            self._last_active + self.server.limits.idle_timeout
        ):
            log.info("closing a connection idle for %.0f s", self.server.limits.idle_timeout)
            self.close(NO_ERROR)
            return
        if self.open_streams():
            self._last_active = self._loop.time()
        self._arm()

    def close(self, code: int = NO_ERROR) -> None:
        """GOAWAY, then close: grpclib's streams on it end, their handlers are cancelled."""
        if self.closed or self.transport is None:
            return
        self.closed = True
        self.transport.write(goaway(self._frames.last_stream, code))
        self.transport.close()


class Server(grpclib.server.Server):
    """grpclib's Server that guards its connections and can close the ones it accepted."""

    def __init__(
        self,
        handlers: Collection[Any],
        limits: Limits | None = None,
        codec: CodecBase | None = None,
    ) -> None:
        super().__init__(list(handlers), codec=codec)
        self.limits = limits or Limits()
        self.guards: set[_Guard] = set()
        self.refused = 0
        """Connections refused because `max_connections` were open."""
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()
        self._factory_called = False
        _require(self, "_handlers")

    def _protocol_factory(self) -> Any:
        """grpclib calls this for every accepted connection; we wrap what it makes."""
        self._factory_called = True
        protocol = super()._protocol_factory()
        _require(protocol, "handler")
        self._protocols.add(protocol)
        return _Guard(protocol, self)

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self.guards)

    async def wait_requests(self) -> None:
        """Wait for the requests in flight, e.g. streams that ended but still send trailers."""
        tasks = [
            t
            for h in _require(self, "_handlers")
            for t in _require(h, "_tasks").values()
            if not t.done()
        ]
        if tasks:
            await asyncio.wait(tasks)

    def close_connections(self) -> None:
        """Close every connection we accepted; the peers see the connection end."""
        for protocol in list(self._protocols):
            # `processor` is set by connection_made(): a protocol without one never connected
            processor = getattr(protocol, "processor", None)
            if processor is not None:
                _require(processor, "close")("server closed")
        for guard in list(self.guards):
            guard.close(NO_ERROR)

    def check_factory_used(self) -> None:
        """Raise unless grpclib created a connection through our `_protocol_factory`."""
        if not self._factory_called:
            raise GrpclibInternalsChanged(
                f"grpclib {grpclib.__version__} accepted a connection without calling "
                "Server._protocol_factory: connections can no longer be closed by aiodp"
            )
