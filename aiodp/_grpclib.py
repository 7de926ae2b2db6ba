"""Why grpclib internals are touched at all, in one place: closing the connections we accepted.

grpclib's `Server.close()` stops listening and cancels handlers but leaves accepted client
connections open (grpclib PR #190), so a peer that keeps its connection (the kubelet does)
would hold it, and our old generation, forever. `Server` below records every protocol it
creates (by overriding the private `_protocol_factory`) and closes them itself, and waits
for the handlers' request tasks (the private `_handlers` and their `_tasks`).

Every private name is checked when the server starts and when it is used: after a grpclib
upgrade that renames one, this raises `GrpclibInternalsChanged` instead of silently doing
nothing. No other module touches a private grpclib name.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Collection
from typing import Any, Final

import grpclib.server
from grpclib.protocol import H2Protocol

TESTED_WITH: Final = "0.4.9"


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


class Server(grpclib.server.Server):
    """grpclib's Server that can also close the connections it accepted."""

    def __init__(self, handlers: Collection[Any]) -> None:
        super().__init__(list(handlers))
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()
        self._factory_called = False
        _require(self, "_handlers")

    def _protocol_factory(self) -> H2Protocol:
        """grpclib calls this for every accepted connection; we keep a weak reference."""
        self._factory_called = True
        protocol = super()._protocol_factory()
        _require(protocol, "handler")
        self._protocols.add(protocol)
        return protocol

    @property
    def connections(self) -> int:
        """Accepted connections still referenced (open or not yet collected)."""
        return len(self._protocols)

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

    def check_factory_used(self) -> None:
        """Raise unless grpclib created a connection through our `_protocol_factory`."""
        if not self._factory_called:
            raise GrpclibInternalsChanged(
                f"grpclib {grpclib.__version__} accepted a connection without calling "
                "Server._protocol_factory: connections can no longer be closed by aiodp"
            )
