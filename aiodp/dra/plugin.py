"""The DRA kubelet plugin's gRPC surface: registration through the kubelet's plugin watcher,
NodePrepareResources / NodeUnprepareResources (dra v1 and v1beta1: kubelets 1.32 to 1.37),
and the device-health stream (dra-health v1alpha1 and v1).

Only translation lives here: a `Preparer` does the claims' work, the registry is the health.
A DRA driver never registers itself: the kubelet finds `<driver>-reg.sock` in its
plugins_registry directory with inotify, calls GetInfo, then dials the endpoint it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from grpclib import GRPCError
from grpclib.const import Status

from aiodp.config.model import Config
from aiodp.dra import claims, slices
from aiodp.gen.dra import pluginregistration as reg
from aiodp.gen.dra import v1 as health_v1
from aiodp.gen.dra import v1alpha1 as health_v1alpha1
from aiodp.gen.dra.k8s.io.kubelet.pkg.apis.dra import v1 as dra_v1
from aiodp.gen.dra.k8s.io.kubelet.pkg.apis.dra import v1beta1 as dra_v1beta1
from aiodp.gpus.devices import Device, DeviceRegistry, Health
from aiodp.kit import _grpclib, sockets
from aiodp.kit.errors import ListenError, brief, cut_text

log = logging.getLogger(__name__)

PLUGIN_TYPE: Final = "DRAPlugin"
SUPPORTED_VERSIONS: Final = (
    "v1.DRAPlugin",
    "v1beta1.DRAPlugin",
    "v1.DRAResourceHealth",
    "v1alpha1.DRAResourceHealth",
)
"""What GetInfo offers: 1.34+ take the first DRAPlugin they know, 1.32/1.33 v1beta1; health
v1 from 1.37, v1alpha1 before."""
MAX_CLAIMS: Final = 256
"""Claims in one prepare/unprepare call (the kubelet sends a pod's claims: a handful)."""
MAX_FIELD: Final = 253
"""Characters in a claim's namespace, name or UID (Kubernetes' own limit on names)."""


class Preparer(Protocol):
    """Prepares and unprepares claims; one claim's failure is that claim's error text."""

    async def prepare(self, refs: Sequence[claims.ClaimRef]) -> Mapping[str, claims.Prepared | str]:
        """Keyed by claim UID: the prepared claim, or why it is not."""
        ...

    async def unprepare(self, refs: Sequence[claims.ClaimRef]) -> Mapping[str, str]:
        """Keyed by claim UID: "" when done (or never prepared), else why not."""
        ...


def _refs(items: Sequence[dra_v1.Claim] | Sequence[dra_v1beta1.Claim]) -> list[claims.ClaimRef]:
    """The request's claims, checked: bounded counts and lengths, UIDs present."""
    if len(items) > MAX_CLAIMS:
        raise GRPCError(
            Status.INVALID_ARGUMENT, f"{len(items)} claims in one call; at most {MAX_CLAIMS}"
        )
    out = []
    for c in items:
        for what, value in (("namespace", c.namespace), ("name", c.name), ("uid", c.uid)):
            if len(value) > MAX_FIELD:
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    f"claim {what} {cut_text(value, 64)!r} is longer than {MAX_FIELD} characters",
                )
        if not c.uid:
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"claim {cut_text(c.namespace, 64)}/"
                f"{cut_text(c.name, 64)} has no uid",
            )  # fmt: skip
        out.append(claims.ClaimRef(c.namespace, c.name, c.uid))
    return out


def _names(refs: Sequence[claims.ClaimRef]) -> str:
    """The claims of a call for one log line: at most 5 named, each cut."""
    return brief([f"{cut_text(r.namespace, 64)}/{cut_text(r.name, 64)}" for r in refs])


class RegistrationService(reg.RegistrationBase):
    """GetInfo for the kubelet's plugin watcher, and what it says of our registration."""

    def __init__(self, config: Config, on_status: Callable[[bool, str], None]) -> None:
        self.config = config
        self.on_status = on_status

    async def get_info(self, message: reg.InfoRequest) -> reg.PluginInfo:
        return reg.PluginInfo(
            type=PLUGIN_TYPE,
            name=self.config.dra_driver_name,
            endpoint=str(self.config.dra_socket),
            supported_versions=list(SUPPORTED_VERSIONS),
        )

    async def notify_registration_status(
        self, message: reg.RegistrationStatus
    ) -> reg.RegistrationStatusResponse:
        error = cut_text(message.error, 300)
        if message.plugin_registered:
            log.info("the kubelet registered DRA driver %s", self.config.dra_driver_name)
        else:
            log.error("the kubelet refused DRA driver %s: %s", self.config.dra_driver_name, error)
        self.on_status(message.plugin_registered, error)
        return reg.RegistrationStatusResponse()


class DraV1Service(dra_v1.DraPluginBase):
    def __init__(self, preparer: Preparer) -> None:
        self.preparer = preparer

    async def node_prepare_resources(
        self, message: dra_v1.NodePrepareResourcesRequest, version: str = "v1"
    ) -> dra_v1.NodePrepareResourcesResponse:
        refs = _refs(message.claims)
        log.info("NodePrepareResources over dra %s: %s", version, _names(refs))
        done = await self.preparer.prepare(refs)
        out = dra_v1.NodePrepareResourcesResponse()
        for uid, result in done.items():
            if isinstance(result, str):
                out.claims[uid] = dra_v1.NodePrepareResourceResponse(error=result)
                continue
            out.claims[uid] = dra_v1.NodePrepareResourceResponse(
                devices=[
                    dra_v1.Device(
                        request_names=list(d.requests),
                        pool_name=d.pool,
                        device_name=d.device,
                        cdi_device_ids=[d.cdi_id],
                    )
                    for d in result.devices
                ]
            )
        return out

    async def node_unprepare_resources(
        self, message: dra_v1.NodeUnprepareResourcesRequest, version: str = "v1"
    ) -> dra_v1.NodeUnprepareResourcesResponse:
        refs = _refs(message.claims)
        log.info("NodeUnprepareResources over dra %s: %s", version, _names(refs))
        done = await self.preparer.unprepare(refs)
        return dra_v1.NodeUnprepareResourcesResponse(
            claims={
                uid: dra_v1.NodeUnprepareResourceResponse(error=err) for uid, err in done.items()
            }
        )


class DraV1beta1Service(dra_v1beta1.DraPluginBase):
    """The same calls under the v1beta1 package (kubelets 1.32 and 1.33); the messages are
    field for field the same, so the v1 answer is re-read as v1beta1."""

    def __init__(self, v1: DraV1Service) -> None:
        self.v1 = v1

    async def node_prepare_resources(
        self, message: dra_v1beta1.NodePrepareResourcesRequest
    ) -> dra_v1beta1.NodePrepareResourcesResponse:
        answer = await self.v1.node_prepare_resources(
            dra_v1.NodePrepareResourcesRequest.parse(bytes(message)), "v1beta1"
        )
        return dra_v1beta1.NodePrepareResourcesResponse.parse(bytes(answer))

    async def node_unprepare_resources(
        self, message: dra_v1beta1.NodeUnprepareResourcesRequest
    ) -> dra_v1beta1.NodeUnprepareResourcesResponse:
        answer = await self.v1.node_unprepare_resources(
            dra_v1.NodeUnprepareResourcesRequest.parse(bytes(message)), "v1beta1"
        )
        return dra_v1beta1.NodeUnprepareResourcesResponse.parse(bytes(answer))


HEALTH_TIMEOUT: Final = 60
"""`health_check_timeout_seconds` of every device: the kubelet reads a device Unknown when it
has not been reported for this long (0 would mean 30 s)."""
RESEND: Final = 20.0
"""Seconds after which the full list is sent again, unchanged: well inside the timeout."""


def health_list(
    devices: Sequence[Device], registry: DeviceRegistry, pool: str
) -> health_v1.NodeWatchResourcesResponse:
    """Every DRA device with its health, when it last changed (whole seconds) and how long
    the kubelet may trust this report (HEALTH_TIMEOUT)."""
    out = health_v1.NodeWatchResourcesResponse()
    for d in devices:
        since = registry.since(d.id)
        out.devices.append(
            health_v1.DeviceHealth(
                device=health_v1.DeviceIdentifier(
                    pool_name=pool, device_name=slices.device_name(d)
                ),
                health=health_v1.HealthStatus.HEALTHY
                if d.health is Health.HEALTHY
                else health_v1.HealthStatus.UNHEALTHY,
                last_updated_time=int(since) if since is not None else 0,
                health_check_timeout_seconds=HEALTH_TIMEOUT,
                message=cut_text(d.reason, 200),
            )
        )
    return out


@dataclass
class HealthStreams:
    """The device-health stream's source: the registry's DRA devices (the same tracker
    ListAndWatch reads) and the pool they are published in."""

    registry: DeviceRegistry
    resource: str
    pool: str
    resend: float = RESEND

    async def lists(self) -> AsyncGenerator[health_v1.NodeWatchResourcesResponse, None]:
        """The full list at once, after every change, and again every `resend` seconds
        without one (the kubelet's health of a device goes stale, Unknown in pod status,
        when it is not reported within its timeout). Until the stream is cancelled."""
        while True:
            devices = self.registry.inventory().for_resource(self.resource)
            yield health_list(devices, self.registry, self.pool)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resend):
                    while self.registry.inventory().for_resource(self.resource) == devices:
                        await self.registry.changed()


class HealthV1Service(health_v1.DraResourceHealthBase):
    def __init__(self, streams: HealthStreams) -> None:
        self.streams = streams

    async def node_watch_resources(
        self, message: health_v1.NodeWatchResourcesRequest
    ) -> AsyncIterator[health_v1.NodeWatchResourcesResponse]:
        log.info("the kubelet opened the DRA health stream (v1)")
        async for msg in self.streams.lists():
            yield msg


class HealthV1alpha1Service(health_v1alpha1.DraResourceHealthBase):
    def __init__(self, streams: HealthStreams) -> None:
        self.streams = streams

    async def node_watch_resources(
        self, message: health_v1alpha1.NodeWatchResourcesRequest
    ) -> AsyncIterator[health_v1alpha1.NodeWatchResourcesResponse]:
        log.info("the kubelet opened the DRA health stream (v1alpha1)")
        async for msg in self.streams.lists():
            yield health_v1alpha1.NodeWatchResourcesResponse.parse(bytes(msg))


@dataclass
class Sockets:
    """Our two bound sockets and their inodes (to see one deleted or replaced)."""

    registration: Path
    registration_inode: int
    endpoint: Path
    endpoint_inode: int


async def _bind(
    services: Sequence[object], path: Path, limits: _grpclib.Limits | None
) -> tuple[_grpclib.Server, int]:
    """Serve `services` on `path` as the device plugin's sockets are served (sockets.bind),
    in a directory made first: the driver's own under the plugins directory is ours."""
    try:
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    except OSError as e:
        raise ListenError(sockets.cannot_serve(path, e)) from None
    srv = _grpclib.Server(list(services), limits, codec=sockets.StrictCodec())
    return srv, await sockets.bind(srv, path)


@contextlib.asynccontextmanager
async def serve(
    config: Config,
    registration: RegistrationService,
    services: Sequence[object],
    *,
    limits: _grpclib.Limits | None = None,
) -> AsyncIterator[Sockets]:
    """Serve the DRA services on `<plugins>/<driver>/dra.sock` first, then Registration on
    `<plugins_registry>/<driver>-reg.sock` (so that the kubelet, finding the second, can
    dial the first); on exit close both and remove the sockets that are still ours."""
    endpoint, endpoint_inode = await _bind(services, config.dra_socket, limits)
    try:
        reg_srv, reg_inode = await _bind([registration], config.dra_registration_socket, limits)
    except BaseException:
        endpoint.close()
        raise
    socks = Sockets(config.dra_registration_socket, reg_inode, config.dra_socket, endpoint_inode)
    log.info("serving DRA driver %s on %s (registration %s)", config.dra_driver_name,
             config.dra_socket, config.dra_registration_socket)  # fmt: skip
    try:
        yield socks
    finally:
        for srv, path, inode in (
            (reg_srv, socks.registration, reg_inode),
            (endpoint, socks.endpoint, endpoint_inode),
        ):
            srv.close()
            srv.close_connections()
            if sockets.socket_inode(path) == inode:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.shutdown_timeout / 4):
                    await srv.wait_closed()
