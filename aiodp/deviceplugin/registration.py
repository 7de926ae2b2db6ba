"""How we announce a resource to the kubelet: Register on kubelet.sock, retried with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from resource import RLIMIT_NOFILE, getrlimit
from typing import Final

from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.exceptions import ProtocolError, StreamTerminatedError

from aiodp.gen.deviceplugin.v1beta1 import DevicePluginOptions, RegisterRequest, RegistrationStub
from aiodp.kit import metrics, retry
from aiodp.kit.errors import cut_text

log = logging.getLogger(__name__)

VERSION: Final = "v1beta1"

QUICK_RETRIES: Final = (0.01, 0.02, 0.05)
"""Seconds between quick retries of a refused connection (a kubelet about to listen)."""
FD_PRESSURE: Final = 0.9
FD_SPARE: Final = 16
"""A failure is blamed on file descriptors when over 90 % of the limit, or all but 16 of
them, are in use."""

TRANSIENT: Final[tuple[type[BaseException], ...]] = (
    OSError,  # FileNotFoundError, ConnectionRefusedError: the kubelet is not (yet) there
    TimeoutError,
    GRPCError,  # the kubelet answers UNKNOWN for a bad name and for a failed dial-back
    ConnectionError,
    StreamTerminatedError,  # the kubelet went away mid-call (it accepted, then closed)
    ProtocolError,  # whatever answered on kubelet.sock spoke no proper HTTP/2
)


async def register_once(
    kubelet_socket: Path,
    endpoint: str,
    resource: str,
    options: DevicePluginOptions,
    *,
    call_timeout: float,
) -> None:
    """One Register call; the kubelet dials us back and calls GetDevicePluginOptions in it."""
    channel = Channel(path=str(kubelet_socket))
    ok = False
    try:
        await RegistrationStub(channel).register(
            RegisterRequest(
                version=VERSION, endpoint=endpoint, resource_name=resource, options=options
            ),
            timeout=call_timeout,
        )
        ok = True
    except GRPCError as e:
        log.error(
            "kubelet refused registration of %s: %s %s",
            resource,
            e.status.name,
            cut_text(e.message or "", 300),
            extra={"resource": resource},
        )
        _report_fd_pressure()  # the kubelet cannot dial back when we cannot accept
        raise
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            _report_fd_pressure()
        raise
    finally:
        channel.close()
        metrics.observe_registration(resource, ok)


def fd_usage() -> tuple[int, int]:
    """(file descriptors open now, the soft limit); blocking but cheap (one listdir)."""
    soft, _ = getrlimit(RLIMIT_NOFILE)
    return len(os.listdir("/proc/self/fd")), soft


def _report_fd_pressure() -> None:
    """Log at ERROR when file descriptors are (nearly) all used: a refusal then means the
    kubelet could not dial back because our accept() failed, not a bad request."""
    with contextlib.suppress(OSError):
        used, limit = fd_usage()
        if limit - used <= max(FD_SPARE, limit * (1 - FD_PRESSURE)):
            log.error(
                "out of file descriptors: %d of %d open; the kubelet cannot connect to us "
                "(raise the limit, or find who holds them)",
                used,
                limit,
            )


async def register(
    kubelet_socket: Path,
    endpoint: str,
    resource: str,
    options: DevicePluginOptions,
    *,
    call_timeout: float,
    delays: Sequence[float],
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Register until the kubelet accepts; connection failures and refusals back off.

    A refused connection is first retried quickly (10, 20, 50 ms): the kubelet creates
    kubelet.sock before it listens, and listen() makes no inotify event to wake us.
    """

    async def attempt() -> None:
        for pause in (*QUICK_RETRIES, None):
            try:
                return await register_once(
                    kubelet_socket, endpoint, resource, options, call_timeout=call_timeout
                )
            except ConnectionRefusedError:
                if pause is None:
                    raise
                log.debug("kubelet.sock refused the connection; again in %.0f ms", pause * 1e3)
                await sleep(pause)

    await retry.retrying(
        attempt,
        delays=delays,
        retry_on=TRANSIENT,
        what=f"registration of {resource}",
        sleep=sleep,
    )
    log.info(
        "registered %s with the kubelet (endpoint %s)",
        resource,
        endpoint,
        extra={"resource": resource},
    )
