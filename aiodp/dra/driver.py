"""The DRA driver as one task of the tree: its kubelet sockets (re-bound when deleted), its
ResourceSlices (re-published on every change), its prepared claims and its health stream.

It serves the devices the plan hands to DRA (`dra.devices`), from the same registry, health
tracker and live config as the device plugin; a GPU is only ever on one of the two APIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, NoReturn, Protocol

from lightkube import AsyncClient

from aiodp.dra import claims, plugin, prepared, publisher, slices
from aiodp.gpus import live, mps, sharing
from aiodp.gpus.devices import DeviceRegistry
from aiodp.kit import aio, sockets, watch

log = logging.getLogger(__name__)


class Report(Protocol):
    """Where the DRA driver says how it is doing (status.Status)."""

    def dra_registered(self, registered: bool, error: str) -> None: ...
    def dra_bound(self) -> None: ...
    def dra_published(self, gpus: frozenset[str]) -> None: ...
    def dra_serving(self, driver: str) -> None: ...


async def _no_api(ref: claims.ClaimRef) -> Mapping[str, Any]:
    raise LookupError(
        f"cannot read ResourceClaim {ref.namespace}/{ref.name}: no Kubernetes API access "
        "(no service account or --kubeconfig, or no NODE_NAME)"
    )


async def run_sockets(
    holder: live.Holder,
    registration: plugin.RegistrationService,
    services: list[object],
    report: Report,
) -> NoReturn:
    """Serve the two sockets; when either is deleted or replaced, bind both again."""
    config = holder.current().config
    while True:
        async with plugin.serve(config, registration, services) as socks:
            report.dra_bound()
            gone = await aio.first_of(
                {
                    "registration": _wait_gone(socks.registration, socks.registration_inode),
                    "endpoint": _wait_gone(socks.endpoint, socks.endpoint_inode),
                }
            )
        log.warning("our DRA %s socket was removed: serving it again", gone)


async def _wait_gone(path: Path, inode: int) -> None:
    """Until our socket at `path` is deleted or another file takes its name."""
    async with watch.DirWatch(path.parent) as dw:
        await dw.wait(lambda: sockets.socket_inode(path) != inode)


async def run_dra(
    holder: live.Holder,
    registry: DeviceRegistry,
    api: AsyncClient | None,
    report: Report,
    daemons: mps.Supervisor | None = None,
) -> NoReturn:
    """The DRA driver: sockets, slices, claims and health, for ever."""
    config = holder.current().config
    driver, node = config.dra_driver_name, config.node_name
    resource = sharing.dra_resource(driver)
    slices_out = None
    read_claim: Any = _no_api
    if api is not None and node:
        slices_out = publisher.Publisher(api, node, driver, report.dra_published)
        read_claim = publisher.ClaimReader(api, slices_out, config.api_timeout).read
    else:
        log.warning(
            "DRA: no Kubernetes API access or no NODE_NAME: no ResourceSlices are published "
            "and claims cannot be prepared; the kubelet side is served"
        )
    preparer = prepared.ClaimPreparer(holder.current, registry, resource, node, read_claim, daemons)
    await preparer.load()

    registration = plugin.RegistrationService(config, report.dra_registered)
    streams = plugin.HealthStreams(registry, resource, node)
    v1 = plugin.DraV1Service(preparer)
    services: list[object] = [
        v1,
        plugin.DraV1beta1Service(v1),
        plugin.HealthV1Service(streams),
        plugin.HealthV1alpha1Service(streams),
    ]
    tasks: aio.Tasks = [("dra-sockets", run_sockets(holder, registration, services, report))]
    if slices_out is not None:

        def desired(taints: bool) -> slices.Pool:
            now = holder.current()
            return slices.pool(
                node, driver, registry.inventory().for_resource(resource),
                {g.uuid: g for g in now.gpus}, now.topo, taints=taints,
            )  # fmt: skip

        async def follow_registry() -> NoReturn:
            while True:
                await registry.changed()
                slices_out.changed()

        async def follow_live() -> NoReturn:
            async for _ in holder.watch():
                slices_out.changed()
            raise RuntimeError("the live state's watch ended")

        delays = config.register_backoff
        tasks += [
            ("dra-slices", slices_out.run(desired, delays)),
            ("dra-slice-watch", slices_out.watch_deletions(delays)),
            ("dra-follow-health", follow_registry()),
            ("dra-follow-config", follow_live()),
        ]
    async with asyncio.TaskGroup() as tg:
        for name, coro in tasks:
            tg.create_task(coro, name=name)
    raise RuntimeError("the DRA task tree ended")


def start(
    holder: live.Holder,
    registry: DeviceRegistry,
    api: AsyncClient | None,
    status: Report,
    stack: contextlib.AsyncExitStack,
    daemons: mps.Supervisor | None = None,
) -> Coroutine[Any, Any, NoReturn]:
    """The DRA driver's task, with its own API client where the node-label one is absent
    (closed with `stack`)."""
    from aiodp.config import pernode  # the API client: only with --dra

    config = holder.current().config
    if api is None and config.node_name:
        api = pernode.client(config, without="no ResourceSlices are published")
        if api is not None:
            stack.push_async_callback(api.close)
    status.dra_serving(config.dra_driver_name)
    return run_dra(holder, registry, api, status, daemons)
