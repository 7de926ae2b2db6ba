"""How we announce a resource to the kubelet: Register on kubelet.sock, retried with backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

from grpclib import GRPCError
from grpclib.client import Channel

from aiodp import metrics, retry
from aiodp.api.v1beta1 import DevicePluginOptions, RegisterRequest, RegistrationStub
from aiodp.errors import cut_text

log = logging.getLogger(__name__)

VERSION: Final = "v1beta1"

TRANSIENT: Final[tuple[type[BaseException], ...]] = (
    OSError,  # FileNotFoundError, ConnectionRefusedError: the kubelet is not (yet) there
    TimeoutError,
    GRPCError,  # the kubelet answers UNKNOWN for a bad name and for a failed dial-back
    ConnectionError,
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
        raise
    finally:
        channel.close()
        metrics.observe_registration(resource, ok)


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
    """Register until the kubelet accepts; connection failures and refusals back off."""
    await retry.retrying(
        lambda: register_once(
            kubelet_socket, endpoint, resource, options, call_timeout=call_timeout
        ),
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
