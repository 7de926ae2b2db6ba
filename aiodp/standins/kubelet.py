"""A kubelet stand-in: the device manager's side of the contract, for the demo and the tests.

It behaves like the real one (kubelet-contract.md §2): serves Registration on kubelet.sock,
checks the version and the resource name, dials the plugin back *inside* Register and calls
GetDevicePluginOptions, then opens one ListAndWatch per registration and never reopens it.
`restart()` deletes the directory's sockets (never `kubelet_internal_checkpoint`) and serves
again, as a restarting kubelet does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Self

import grpclib.server
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError

from aiodp.gen.deviceplugin.v1beta1 import (
    AllocateRequest,
    AllocateResponse,
    ContainerAllocateRequest,
    ContainerPreferredAllocationRequest,
    Device,
    DevicePluginOptions,
    DevicePluginStub,
    Empty,
    PreferredAllocationRequest,
    RegisterRequest,
    RegistrationBase,
)

log = logging.getLogger(__name__)

VERSION: Final = "v1beta1"
CHECKPOINT: Final = "kubelet_internal_checkpoint"
_QUALIFIED_NAME: Final = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN: Final = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


def valid_resource_name(name: str) -> bool:
    """The kubelet's extended-resource-name rule (kubelet-contract.md §2.2)."""
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    prefix, _, rest = ("requests." + name).rpartition("/")
    return (
        0 < len(prefix) <= 253
        and bool(_DNS1123_SUBDOMAIN.match(prefix))
        and 0 < len(rest) <= 63
        and bool(_QUALIFIED_NAME.match(rest))
    )


@dataclass(frozen=True)
class Registration:
    """One accepted Register call, as the kubelet saw it."""

    resource: str
    endpoint: str
    options: DevicePluginOptions
    at: float
    """`time.monotonic()` when the kubelet accepted it."""


@dataclass(frozen=True)
class Update:
    """One ListAndWatch message received (or the stream's end, `ended=True`)."""

    resource: str
    devices: tuple[Device, ...]
    at: float
    ended: bool = False


@dataclass
class _Endpoint:
    registration: Registration
    channel: Channel
    stub: DevicePluginStub
    task: asyncio.Task[None] | None = None
    devices: tuple[Device, ...] = ()
    connected: bool = True


@dataclass
class FakeKubelet:
    """Use as `async with FakeKubelet(directory) as kubelet:`."""

    directory: Path
    dial_delay: float = 0.0
    """Seconds to wait inside Register before dialing back (a slow kubelet)."""
    reject: str | None = None
    """When set, every Register is refused with this message (status UNKNOWN)."""
    open_streams: bool = True
    """False: accept registrations but never open ListAndWatch (a stuck kubelet)."""
    registrations: asyncio.Queue[Registration] = field(default_factory=asyncio.Queue)
    updates: asyncio.Queue[Update] = field(default_factory=asyncio.Queue)
    register_calls: int = 0
    _endpoints: dict[str, _Endpoint] = field(default_factory=dict)
    _server: grpclib.server.Server | None = None
    _tasks: asyncio.TaskGroup | None = None
    _called: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def socket(self) -> Path:
        return self.directory / "kubelet.sock"

    async def __aenter__(self) -> Self:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        assert self._tasks is not None
        await self._tasks.__aexit__(None, None, None)
        self._tasks = None

    async def start(self) -> None:
        """Listen on kubelet.sock (re-created if it exists)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self._server = grpclib.server.Server([_Registration(self)])
        await self._server.start(path=str(self.socket))

    async def stop(self) -> None:
        """Die: close the registration server and every plugin connection."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None
        for ep in list(self._endpoints.values()):
            await self._disconnect(ep)
        self._endpoints.clear()

    async def restart(self) -> None:
        """A kubelet restart as plugins see it.

        DELETE kubelet.sock, DELETE the plugins' sockets, CREATE kubelet.sock.
        """
        await self.stop()
        self.clean_directory()
        await self.start()

    def clean_directory(self) -> None:
        """Remove the sockets in the directory, kubelet.sock first; keep the checkpoint."""
        entries = sorted(self.directory.iterdir(), key=lambda p: p.name != "kubelet.sock")
        for entry in entries:
            if entry.name == CHECKPOINT:
                continue
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(entry.lstat().st_mode):
                    entry.unlink()

    async def _disconnect(self, ep: _Endpoint) -> None:
        if ep.task is not None:
            ep.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ep.task
        ep.channel.close()
        ep.connected = False

    async def end_stream(self, resource: str) -> None:
        """Drop the resource's ListAndWatch from the kubelet's side (a kubelet-side disconnect)."""
        ep = self._endpoints.pop(resource)
        await self._disconnect(ep)

    def endpoint(self, resource: str) -> _Endpoint:
        ep = self._endpoints.get(resource)
        if ep is None:
            raise KeyError(f"{resource} is not registered")
        return ep

    def devices(self, resource: str) -> tuple[Device, ...]:
        """The newest device list received for `resource`."""
        return self.endpoint(resource).devices

    async def allocate(self, resource: str, *requests: Sequence[str]) -> AllocateResponse:
        req = AllocateRequest(
            container_requests=[ContainerAllocateRequest(devices_ids=list(r)) for r in requests]
        )
        return await self.endpoint(resource).stub.allocate(req, timeout=10)

    async def preferred(
        self, resource: str, available: Sequence[str], must: Sequence[str], size: int
    ) -> list[str]:
        req = PreferredAllocationRequest(
            container_requests=[
                ContainerPreferredAllocationRequest(
                    available_deviceIDs=list(available),
                    must_include_deviceIDs=list(must),
                    allocation_size=size,
                )
            ]
        )
        resp = await self.endpoint(resource).stub.get_preferred_allocation(req, timeout=10)
        return list(resp.container_responses[0].device_i_ds)

    async def wait_register_calls(self, count: int) -> None:
        """Return once Register has been called at least `count` times (accepted or not)."""
        while self.register_calls < count:
            await self._called.wait()

    async def _register(self, req: RegisterRequest) -> None:
        self.register_calls += 1
        called, self._called = self._called, asyncio.Event()
        called.set()
        if req.version != VERSION:
            raise GRPCError(
                Status.UNKNOWN,
                f'requested API version "{req.version}" is not supported by kubelet. '
                f'Supported version is ["{VERSION}"]',
            )
        if not valid_resource_name(req.resource_name):
            raise GRPCError(Status.UNKNOWN, f'the ResourceName "{req.resource_name}" is invalid')
        if self.reject is not None:
            raise GRPCError(Status.UNKNOWN, self.reject)
        if self.dial_delay:
            await asyncio.sleep(self.dial_delay)
        path = self.directory / req.endpoint.lstrip("/")
        channel = Channel(path=str(path))
        stub = DevicePluginStub(channel)
        try:
            options = await stub.get_device_plugin_options(Empty(), timeout=10)
        except (OSError, GRPCError, TimeoutError) as e:
            channel.close()
            raise GRPCError(Status.UNKNOWN, f"failed to get device plugin options: {e!r}") from None
        except BaseException:  # cancelled: this kubelet is stopping
            channel.close()
            raise
        registration = Registration(req.resource_name, req.endpoint, options, time.monotonic())
        old = self._endpoints.pop(req.resource_name, None)
        if old is not None:
            await self._disconnect(old)
        ep = _Endpoint(registration, channel, stub)
        self._endpoints[req.resource_name] = ep
        assert self._tasks is not None
        if self.open_streams:
            ep.task = self._tasks.create_task(
                self._watch(ep), name=f"kubelet-law-{req.resource_name}"
            )
        self.registrations.put_nowait(registration)

    async def _watch(self, ep: _Endpoint) -> None:
        resource = ep.registration.resource
        try:
            async for msg in ep.stub.list_and_watch(Empty()):
                ep.devices = tuple(msg.devices)
                self.updates.put_nowait(Update(resource, ep.devices, time.monotonic()))
        except (GRPCError, OSError, StreamTerminatedError) as e:
            log.info("kubelet: ListAndWatch of %s failed: %r", resource, e)
        ep.connected = False
        self.updates.put_nowait(Update(resource, ep.devices, time.monotonic(), ended=True))


class _Registration(RegistrationBase):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet

    async def register(self, message: RegisterRequest) -> Empty:
        await self.kubelet._register(message)
        return Empty()
