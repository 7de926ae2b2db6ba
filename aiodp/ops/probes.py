"""How the kubelet and Prometheus see us: /metrics, /healthz and /readyz over plain HTTP.

A small asyncio handler (no thread, no second loop): one request per connection, GET or
HEAD only, request line and headers bounded, a slow client timed out. Anything malformed
gets a 4xx and the connection closes; the plugin is not disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from aiodp.kit import metrics
from aiodp.kit.errors import ListenError

log = logging.getLogger(__name__)

MAX_LINE: Final = 8192
MAX_HEADERS: Final = 100
MAX_CONNECTIONS: Final = 64
"""Connections served at once; more are closed at once (Prometheus and the kubelet's probes
use a handful), so a flood of idle connections cannot use up our file descriptors."""
READ_TIMEOUT: Final = 5.0

Check = Callable[[], str | None]
"""None when fine, else a one-line reason."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(address: str) -> tuple[str | None, int]:
    host, _, port = address.rpartition(":")
    return (host.strip("[]") or None), int(port)


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


async def _line(reader: asyncio.StreamReader, too_long: _BadRequest) -> bytes:
    """One CRLF-terminated line; `too_long` past the reader's limit, 400 if cut short."""
    try:
        return await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise too_long from None
    except asyncio.IncompleteReadError:
        raise _BadRequest(400, "incomplete request") from None


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    line = await _line(reader, _BadRequest(414, "request line too long"))
    parts = line.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    method, target, _ = parts
    for _ in range(MAX_HEADERS):
        header = await _line(reader, _BadRequest(431, "header too long"))
        if header == b"\r\n":
            break
    else:
        raise _BadRequest(431, "too many headers")
    return method, target


class Probes:
    """Answers the three paths from the checks it is given."""

    def __init__(
        self,
        liveness: Check,
        readiness: Check,
        status: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.liveness = liveness
        self.readiness = readiness
        self.status = status
        """The node as the plugin sees it, for /status (read-only JSON)."""
        self.open = 0
        """Connections being answered now."""
        self.refused = 0

    def answer(self, method: str, target: str) -> tuple[int, bytes, str]:
        if method not in ("GET", "HEAD"):
            return 405, b"only GET and HEAD\n", "text/plain"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            body, ctype = metrics.render()
            return 200, body, ctype
        if path == "/status" and self.status is not None:
            return 200, json.dumps(self.status(), indent=1).encode() + b"\n", "application/json"
        if path in ("/healthz", "/readyz"):
            problem = (self.liveness if path == "/healthz" else self.readiness)()
            if problem is None:
                return 200, b"ok\n", "text/plain"
            return 503, problem.encode() + b"\n", "text/plain"
        return 404, b"not found: try /metrics, /healthz, /readyz, /status\n", "text/plain"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection; over MAX_CONNECTIONS at once, closed unanswered."""
        if self.open >= MAX_CONNECTIONS:
            self.refused += 1
            writer.close()
            return
        self.open += 1
        try:
            await self._answer(reader, writer)
        finally:
            self.open -= 1  # before the peer can see the connection end
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                method, target = await _read_request(reader)
            status, body, ctype = self.answer(method, target)
        except _BadRequest as e:
            status, body, ctype = e.status, f"{e}\n".encode(), "text/plain"
        except TimeoutError:
            status, body, ctype = 408, b"request timeout\n", "text/plain"
        except (ConnectionError, OSError):
            return
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()


@contextlib.asynccontextmanager
async def serve(address: str, probes: Probes) -> AsyncIterator[Endpoint]:
    """Listen on HOST:PORT (":PORT" for every address) until the block exits."""
    host, port = parse_address(address)
    try:
        server = await asyncio.start_server(probes.handle, host, port, limit=MAX_LINE)
    except OSError as e:
        raise ListenError(
            f"--metrics-address {address}: cannot listen: {e.strerror or e}"
            " (another process has the port? set another, or empty to turn it off)"
        ) from None
    sock = server.sockets[0].getsockname()
    endpoint = Endpoint(str(sock[0]), int(sock[1]))
    log.info(
        "metrics and probes on http://%s (/metrics, /healthz, /readyz, /status)", endpoint.address
    )
    try:
        yield endpoint
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await server.wait_closed()


async def run_probes(address: str, probes: Probes, bound: asyncio.Future[Endpoint]) -> NoReturn:
    """Serve until cancelled; `bound` gets the address actually bound (port 0 picks one)."""
    async with serve(address, probes) as endpoint:
        bound.set_result(endpoint)
        await asyncio.Event().wait()
    raise RuntimeError("the probes server ended")
