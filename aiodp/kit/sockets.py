"""Serving grpclib on a unix socket, as both kubelet plugins do: bind with a stale socket of
ours removed and mode 0600, the socket's inode (to see it deleted or replaced), one line on why
it cannot be made, and a codec that makes undecodable bytes the client's fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
from pathlib import Path
from typing import Any, Final, cast

import betterproto2
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec

from aiodp.kit import _grpclib
from aiodp.kit.errors import ListenError, cut_text

log = logging.getLogger(__name__)

SOCKET_MODE: Final = 0o600
"""Our sockets are for the kubelet, which is root: nobody else connects."""

_INTS: Final = frozenset(
    {"int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32", "fixed64"}
    | {"sfixed32", "sfixed64", "enum"}
)


_PY_TYPES: Final[dict[str, type]] = {"string": str, "bytes": bytes, "bool": bool}


def _scalar_fits(proto_type: str, value: object) -> bool:
    if proto_type in _INTS:
        return isinstance(value, int) and not isinstance(value, bool)
    expected = _PY_TYPES.get(proto_type)
    return expected is None or isinstance(value, expected)


def _wrong_type(message: betterproto2.Message, depth: int = 0) -> str | None:
    """Where a decoded message holds a value of the wrong type, if anywhere.

    betterproto2 does not check wire types: a varint where a message belongs decodes to an
    int, and would reach the handlers as one.
    """
    if depth > 16:
        return "nested too deeply"
    for f in dataclasses.fields(cast(Any, message)):
        meta = f.metadata.get("betterproto")
        if meta is None:
            continue
        value = getattr(message, f.name)
        if meta.proto_type == "map":
            if not isinstance(value, dict):
                return f.name
            continue
        if meta.repeated:
            if not isinstance(value, list):
                return f.name
            values = value
        else:
            values = [value]
        for v in values:
            if v is None and not meta.repeated and (meta.optional or meta.proto_type == "message"):
                continue
            if meta.proto_type == "message":
                if not isinstance(v, betterproto2.Message):
                    return f.name
                inner = _wrong_type(v, depth + 1)
                if inner is not None:
                    return f"{f.name}.{inner}"
            elif not _scalar_fits(meta.proto_type, v):
                return f.name
    return None


class StrictCodec(ProtoCodec):
    """Protobuf as grpclib decodes it, but bytes we cannot take are the client's fault:
    INVALID_ARGUMENT and one WARNING line, never UNKNOWN and a traceback."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        name = getattr(message_type, "__name__", "message")
        try:
            message = message_type.FromString(data)
            where = _wrong_type(message)
        except Exception as e:  # betterproto2 raises many kinds on malformed bytes
            problem = cut_text(f"{type(e).__name__}: {e}", 120)
        else:
            if where is None:
                return message
            problem = f"wrong wire type for field {where}"
        log.warning("malformed %s (%d bytes): %s", name, len(data), problem)
        raise GRPCError(Status.INVALID_ARGUMENT, f"malformed {name}: {problem}")


def socket_inode(path: Path) -> int | None:
    """The inode of the unix socket at `path`, or None when there is no socket there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


def cannot_serve(path: Path, e: OSError) -> str:
    """One line on why our socket cannot be created: which directory, which access, what to do."""
    directory = path.parent
    try:
        st = os.stat(directory)
        owner = f"owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}"
    except OSError:
        owner = "not readable"
    what = e.strerror or str(e)
    hint = ""
    if isinstance(e, PermissionError) and os.geteuid() != 0:
        hint = (
            f"; aiodp runs as uid {os.geteuid()} and needs write access there: run it as root"
            " (the kubelet's directory is root's, and so is the kubelet)"
        )
    elif isinstance(e, PermissionError):
        hint = "; root without write access there: a read-only mount, or dropped capabilities?"
    return f"cannot create our socket {path}: {what} (directory {directory} {owner}){hint}"


def cannot_create_in(directory: Path) -> str | None:
    """Why this process could not create a socket in `directory` (or in it once it exists),
    in one line; None when it can. Root can; anyone else needs write access there."""
    where = directory
    while True:
        try:
            st = os.stat(where)
            break
        except PermissionError:
            return _unwritable(directory, where.parent)
        except OSError:  # not there (yet): what counts is the nearest directory that is
            if where.parent == where:
                return None
            where = where.parent
    if not stat.S_ISDIR(st.st_mode) or os.access(where, os.W_OK | os.X_OK):
        return None
    return _unwritable(directory, where)


def _unwritable(directory: Path, blocking: Path) -> str:
    try:
        st = os.stat(blocking)
        owner = f"owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}"
    except OSError:
        owner = "not readable"
    return (
        f"cannot create our sockets in {directory}: uid {os.geteuid()} has no write access to "
        f"{blocking} ({owner}); run aiodp as root, as the kubelet runs"
    )


def unlink(path: Path) -> None:
    """Remove our socket file (the name is ours: a stale one from an earlier run goes too)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def bind(server: _grpclib.Server, path: Path) -> int:
    """Start `server` on the unix socket `path` (a stale socket of ours removed first, mode
    0600); its inode. A socket that cannot be made is a ListenError saying why in one line."""
    try:
        unlink(path)
        await server.start(path=str(path))
        os.chmod(path, SOCKET_MODE)
    except OSError as e:
        raise ListenError(cannot_serve(path, e)) from None
    inode = socket_inode(path)
    if inode is None:  # pragma: no cover - the kernel just created it
        server.close()
        raise OSError(f"socket {path} vanished right after binding")
    return inode
