"""The DRA driver as one task of the tree: its kubelet sockets (re-bound when deleted), its
ResourceSlices (re-published on every change), its prepared claims and its health stream.

It serves the devices the plan hands to DRA (`dra.devices`), from the same registry, health
tracker and live config as the device plugin; a GPU is only ever on one of the two APIs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, NoReturn, Protocol

from lightkube import AsyncClient

from aiodp import (
    aiokit,
    claims,
    draclaims,
    draplugin,
    reload,
    resourceslices,
    server,
    sharing,
    slices,
    watch,
)
from aiodp.devices import DeviceRegistry

log = logging.getLogger(__name__)


class Report(Protocol):
    """Where the DRA driver says how it is doing (status.Status)."""

    def dra_registered(self, registered: bool, error: str) -> None: ...
    def dra_bound(self) -> None: ...
    def dra_published(self, gpus: frozenset[str]) -> None: ...


async def _no_api(ref: claims.ClaimRef) -> Mapping[str, Any]:
    raise LookupError(
        f"cannot read ResourceClaim {ref.namespace}/{ref.name}: no Kubernetes API access "
        "(no service account or --kubeconfig, or no NODE_NAME)"
    )


async def run_sockets(
    holder: reload.Holder,
    registration: draplugin.RegistrationService,
    services: list[object],
    report: Report,
) -> NoReturn:
    """Serve the two sockets; when either is deleted or replaced, bind both again."""
    config = holder.current().config
    while True:
        async with draplugin.serve(config, registration, services) as socks:
            report.dra_bound()
            gone = await aiokit.first_of(
                {
                    "registration": _wait_gone(socks.registration, socks.registration_inode),
                    "endpoint": _wait_gone(socks.endpoint, socks.endpoint_inode),
                }
            )
        log.warning("our DRA %s socket was removed: serving it again", gone)


async def _wait_gone(path: Path, inode: int) -> None:
    """Until our socket at `path` is deleted or another file takes its name."""
    async with watch.DirWatch(path.parent) as dw:
        await dw.wait(lambda: server.socket_inode(path) != inode)


async def run_dra(
    holder: reload.Holder,
    registry: DeviceRegistry,
    api: AsyncClient | None,
    report: Report,
) -> NoReturn:
    """The DRA driver: sockets, slices, claims and health, for ever."""
    config = holder.current().config
    driver, node = config.dra_driver_name, config.node_name
    resource = sharing.dra_resource(driver)
    publisher = None
    read_claim: Any = _no_api
    if api is not None and node:
        publisher = resourceslices.Publisher(api, node, driver, report.dra_published)
        read_claim = resourceslices.ClaimReader(api, publisher, config.api_timeout).read
    else:
        log.warning(
            "DRA: no Kubernetes API access or no NODE_NAME: no ResourceSlices are published "
            "and claims cannot be prepared; the kubelet side is served"
        )
    preparer = draclaims.ClaimPreparer(holder.current, registry, resource, node, read_claim)
    await preparer.load()

    registration = draplugin.RegistrationService(config, report.dra_registered)
    streams = draplugin.HealthStreams(registry, resource, node)
    v1 = draplugin.DraV1Service(preparer)
    services: list[object] = [
        v1,
        draplugin.DraV1beta1Service(v1),
        draplugin.HealthV1Service(streams),
        draplugin.HealthV1alpha1Service(streams),
    ]
    tasks: list[tuple[str, Coroutine[Any, Any, NoReturn]]] = [
        ("dra-sockets", run_sockets(holder, registration, services, report))
    ]
    if publisher is not None:

        def desired(taints: bool) -> slices.Pool:
            live = holder.current()
            return slices.pool(
                node, driver, registry.inventory().for_resource(resource),
                {g.uuid: g for g in live.gpus}, live.topo, taints=taints,
            )  # fmt: skip

        async def follow_registry() -> NoReturn:
            while True:
                await registry.changed()
                publisher.changed()

        async def follow_live() -> NoReturn:
            async for _ in holder.watch():
                publisher.changed()
            raise RuntimeError("the live state's watch ended")

        delays = config.register_backoff
        tasks += [
            ("dra-slices", publisher.run(desired, delays)),
            ("dra-slice-watch", publisher.watch_deletions(delays)),
            ("dra-follow-health", follow_registry()),
            ("dra-follow-config", follow_live()),
        ]
    async with asyncio.TaskGroup() as tg:
        for name, coro in tasks:
            tg.create_task(coro, name=name)
    raise RuntimeError("the DRA task tree ended")
