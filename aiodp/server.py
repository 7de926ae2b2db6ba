"""How the kubelet talks to us: the DevicePlugin gRPC service on a unix socket.

An adapter: request -> domain types -> one pure function -> response. Domain errors are
mapped to gRPC statuses in one place, `grpc_errors()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import stat
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import grpclib.server
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.protocol import H2Protocol

from aiodp import allocate, metrics, topology
from aiodp.api.v1beta1 import (
    AllocateRequest,
    AllocateResponse,
    ContainerPreferredAllocationResponse,
    Device,
    DevicePluginBase,
    DevicePluginOptions,
    Empty,
    ListAndWatchResponse,
    NumaNode,
    PreferredAllocationRequest,
    PreferredAllocationResponse,
    PreStartContainerRequest,
    PreStartContainerResponse,
    TopologyInfo,
)
from aiodp.config import Config
from aiodp.devices import Device as DomainDevice
from aiodp.devices import DeviceRegistry, Inventory, Resource
from aiodp.errors import InvalidRequest, UnhealthyDevice, UnknownDevice

log = logging.getLogger(__name__)

OPTIONS: Final = DevicePluginOptions(
    pre_start_required=False, get_preferred_allocation_available=True
)
"""Sent in RegisterRequest and by GetDevicePluginOptions: both must agree."""


@contextlib.contextmanager
def grpc_errors() -> Iterator[None]:
    """Map domain errors to the gRPC status that says whose fault it is."""
    try:
        yield
    except InvalidRequest as e:
        raise GRPCError(Status.INVALID_ARGUMENT, str(e)) from None
    except UnhealthyDevice as e:
        raise GRPCError(Status.FAILED_PRECONDITION, str(e)) from None


@contextlib.contextmanager
def observed(method: str, resource: str) -> Iterator[None]:
    """Count the call by its gRPC status and time it; domain errors mapped inside."""
    start = time.perf_counter()
    code = "UNKNOWN"
    try:
        with grpc_errors():
            yield
        code = "OK"
    except GRPCError as e:
        code = e.status.name
        raise
    finally:
        metrics.observe_request(method, resource, code, time.perf_counter() - start)


def _api_device(device_id: str, health: str, numa_node: int | None) -> Device:
    """One device as the kubelet sees it; an unknown NUMA node sends no TopologyInfo."""
    topology = None if numa_node is None else TopologyInfo(nodes=[NumaNode(id=numa_node)])
    return Device(id=device_id, health=health, topology=topology)


def to_api(devices: Sequence[DomainDevice]) -> ListAndWatchResponse:
    """The generated message for a device list (the reference `snapshot` is tested against)."""
    return ListAndWatchResponse(
        devices=[_api_device(d.id, d.health.value, d.numa_node) for d in devices]
    )


class _Snapshot(ListAndWatchResponse):
    """A ListAndWatchResponse whose wire bytes are put together from cached per-device bytes.

    grpclib's codec calls `SerializeToString()`; betterproto2 would re-encode every device
    on every change, which costs ~18 ms for 1,024 replicas, against ~0.3 ms here.
    """

    def __init__(self, wire: bytes) -> None:
        super().__init__()
        self._wire = wire

    def SerializeToString(self) -> bytes:  # the protobuf method name grpclib calls
        return self._wire

    def __bytes__(self) -> bytes:
        return self._wire


@functools.lru_cache(maxsize=8192)
def _device_field(device_id: str, health: str, numa_node: int | None) -> bytes:
    """Field 1 of ListAndWatchResponse for one device: tag, length, Device message."""
    body = bytes(_api_device(device_id, health, numa_node))
    return b"\x0a" + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def snapshot(devices: Sequence[DomainDevice]) -> ListAndWatchResponse:
    """The same wire bytes as `to_api(devices)`, from cached pieces."""
    return _Snapshot(b"".join(_device_field(d.id, d.health.value, d.numa_node) for d in devices))


class DevicePluginService(DevicePluginBase):
    """The five DevicePlugin RPCs for one resource, answered from the registry."""

    def __init__(
        self,
        resource: Resource | str,
        registry: DeviceRegistry,
        config: Config,
        topo: topology.Topology,
        control_paths: Sequence[str] = (),
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.spec = resource if isinstance(resource, Resource) else Resource(resource)
        self.resource = self.spec.name
        self.registry = registry
        self.config = config
        self.topo = topo
        self.control_paths = tuple(control_paths)
        self.on_change = on_change or (lambda: None)
        """Called when a stream opens or ends (readiness depends on it)."""
        self.closing = asyncio.Event()
        """Set by `close_streams()`: every ListAndWatch returns normally."""
        self.stream_opened = asyncio.Event()
        self.stream_lost = asyncio.Event()
        """Set when a ListAndWatch stream ended without us closing it (kubelet side)."""
        self.open_streams = 0
        self._streams_done = asyncio.Event()
        self._streams_done.set()

    async def get_device_plugin_options(self, message: Empty) -> DevicePluginOptions:
        return OPTIONS

    async def list_and_watch(self, message: Empty) -> AsyncIterator[ListAndWatchResponse]:
        self.open_streams += 1
        self._streams_done.clear()
        self.stream_opened.set()
        metrics.stream_opened(self.resource)
        self.on_change()
        log.info("ListAndWatch opened for %s", self.resource, extra={"resource": self.resource})
        try:
            async for devices in self.registry.watch(self.resource, until=self.closing):
                log.debug("ListAndWatch %s: sending %d devices", self.resource, len(devices))
                yield snapshot(devices)
                metrics.observe_snapshot(self.resource)
        finally:
            metrics.stream_closed(self.resource)
            self.open_streams -= 1
            self.on_change()
            if not self.open_streams:
                self._streams_done.set()
            if not self.closing.is_set() and not self.open_streams:
                log.warning(
                    "ListAndWatch for %s ended by the kubelet",
                    self.resource,
                    extra={"resource": self.resource},
                )
                self.stream_lost.set()

    async def get_preferred_allocation(
        self, message: PreferredAllocationRequest
    ) -> PreferredAllocationResponse:
        inventory = self.registry.inventory()
        out = []
        with observed("GetPreferredAllocation", self.resource):
            for req in message.container_requests:
                available = list(dict.fromkeys(req.available_deviceIDs))
                must = list(dict.fromkeys(req.must_include_deviceIDs))
                unknown = [
                    i
                    for i in dict.fromkeys(available + must)
                    if (d := inventory.get(i)) is None or d.resource != self.resource
                ]
                if unknown:
                    raise UnknownDevice(unknown)
                ids = self._preferred(inventory, available, must, req.allocation_size)
                out.append(ContainerPreferredAllocationResponse(device_i_ds=ids))
        return PreferredAllocationResponse(container_responses=out)

    def _preferred(
        self, inventory: Inventory, available: list[str], must: list[str], size: int
    ) -> list[str]:
        """Whole GPUs by topology; replicas and MIG devices by the shared-devices policy."""
        devices = inventory.for_resource(self.resource)
        if all(d.replica is None and ":" not in d.index for d in devices):
            return topology.preferred(available, must, size, self.topo)
        group: dict[str, str] = {d.id: d.uuid if d.replica is not None else d.gpu for d in devices}
        totals = collections.Counter(group.values())
        order: dict[str, int] = {d.id: i for i, d in enumerate(devices)}
        return topology.preferred_grouped(
            available, must, size, group, totals, order,
            self.config.shared_devices_allocation_policy,
        )  # fmt: skip

    async def allocate(self, message: AllocateRequest) -> AllocateResponse:
        inventory = self.registry.inventory()
        with observed("Allocate", self.resource):
            responses = [
                allocate.build_response(
                    req.devices_ids, inventory, self.spec, self.config, self.control_paths
                )
                for req in message.container_requests
            ]
        log.debug("Allocate %s: %d container(s)", self.resource, len(responses))
        return AllocateResponse(container_responses=responses)

    async def pre_start_container(
        self, message: PreStartContainerRequest
    ) -> PreStartContainerResponse:
        return PreStartContainerResponse()

    async def close_streams(self, within: float) -> None:
        """End every ListAndWatch normally, so the kubelet sees a clean end of stream."""
        self.closing.set()
        self.registry.wake()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._streams_done.wait()


class _Server(grpclib.server.Server):
    """grpclib's Server that can also close the connections it accepted.

    `Server.close()` cancels handlers but leaves client connections open (grpclib PR #190),
    so a peer that keeps its connection (the kubelet does) would hold it forever.
    """

    def __init__(self, handlers: Sequence[DevicePluginBase]) -> None:
        super().__init__(list(handlers))
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        self._protocols.add(protocol)
        return protocol

    async def wait_requests(self) -> None:
        """Wait for the requests in flight, e.g. streams that ended but still send trailers."""
        tasks = [
            t for h in self._handlers for t in getattr(h, "_tasks", {}).values() if not t.done()
        ]
        if tasks:
            await asyncio.wait(tasks)

    def close_connections(self) -> None:
        for protocol in list(self._protocols):
            processor = getattr(protocol, "processor", None)
            if processor is not None:
                processor.close("server closed")


class PluginServer:
    """A running server for one resource: its service, socket path and socket inode."""

    def __init__(self, service: DevicePluginService, path: Path, inode: int) -> None:
        self.service = service
        self.path = path
        self.inode = inode

    def socket_intact(self) -> bool:
        """Whether our socket file is still the one we bound (not deleted or replaced)."""
        return socket_inode(self.path) == self.inode


def socket_inode(path: Path) -> int | None:
    """The inode of the unix socket at `path`, or None when there is no socket there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


def _unlink(path: Path) -> None:
    """Remove our socket file (the name is ours: a stale one from an earlier run goes too)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.asynccontextmanager
async def serve(
    service: DevicePluginService, path: Path, *, shutdown_timeout: float
) -> AsyncIterator[PluginServer]:
    """Serve `service` on the unix socket `path` until the block exits.

    On exit the streams end normally first, then the server closes (bounded: grpclib's
    wait_closed can hang while a peer holds its connection), then our socket is removed.
    """
    _unlink(path)
    server = _Server([service])
    await server.start(path=str(path))
    inode = socket_inode(path)
    if inode is None:  # pragma: no cover - the kernel just created it
        server.close()
        raise OSError(f"socket {path} vanished right after binding")
    log.info("serving %s on %s", service.resource, path, extra={"resource": service.resource})
    handle = PluginServer(service, path, inode)
    try:
        yield handle
    finally:
        await _close(server, service, handle, shutdown_timeout)


async def _close(
    server: _Server, service: DevicePluginService, handle: PluginServer, bound: float
) -> None:
    """End the streams, let their trailers out, close everything, remove our socket.

    The waits are bounded and best effort; the closing itself also happens when a second
    cancellation (a shutdown during a re-registration) interrupts them.
    """
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound / 2):
                await service.close_streams(bound / 2)
                await server.wait_requests()
    finally:
        server.close()
        server.close_connections()
        if handle.socket_intact():  # never remove a socket someone else bound since
            _unlink(handle.path)
        log.debug("closed %s on %s", service.resource, handle.path)
    # Best effort: let the transports' close callbacks run (3.12+ also waits for peers).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(bound / 4):
            await server.wait_closed()
            await asyncio.sleep(0)
