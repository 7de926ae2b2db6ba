"""How each resource stays registered: one plugin per resource, generation after generation.

A generation serves the resource on a fresh socket, registers it, and waits for a reason to
start over: our socket removed, kubelet.sock re-created (a kubelet restart), the kubelet
ending our ListAndWatch or never opening it, or the live plan no longer having the resource
as it was. Leaving the `serve` block ends our streams, closes the server and removes our
socket before the next generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from aiodp.deviceplugin import registration as reg
from aiodp.deviceplugin import server
from aiodp.gpus.devices import DeviceRegistry, Resource
from aiodp.gpus.live import Holder
from aiodp.kit import aio, sockets, watch
from aiodp.ops.status import Status

log = logging.getLogger(__name__)

RETIRED: str = "the config no longer has it as it was"
STREAM_LOST: str = "the kubelet ended ListAndWatch"


class _Restart(Exception):
    """A registration attempt is moot: the kubelet or our socket changed under it."""


async def _opened_in_time(service: server.DevicePluginService, within: float) -> None:
    """Return only if the kubelet did not open ListAndWatch `within` seconds of Register."""
    try:
        async with asyncio.timeout(within):
            await service.stream_opened.wait()
    except TimeoutError:
        return
    await asyncio.Event().wait()


@dataclass(frozen=True)
class _KubeletMark:
    """The kubelet instance a generation works with: kubelet.sock's event count and inode."""

    dw: watch.DirWatch
    path: Path
    events: int
    inode: int | None

    @classmethod
    def now(cls, dw: watch.DirWatch, path: Path) -> _KubeletMark:
        return cls(dw, path, dw.seen([path.name]), sockets.socket_inode(path))

    def changed(self) -> bool:
        """kubelet.sock was deleted or created since, or is another file now."""
        return (
            self.dw.seen([self.path.name]) != self.events
            or sockets.socket_inode(self.path) != self.inode
        )


async def run_plugins(holder: Holder, registry: DeviceRegistry, status: Status) -> NoReturn:
    """One plugin task per advertised resource, kept in step with the live plan.

    A registration is a resource name with our fixed options, so a new plan retires only
    removed resources (streams end, socket removed) and starts only new ones, each
    registering on its own. A resource that stays keeps its server, registration and stream:
    its new device list goes over the open stream, its new sharing settings are read by the
    next call.
    """
    plugin_dir = holder.current().config.plugin_dir
    denied = sockets.cannot_create_in(plugin_dir)
    if denied is not None:  # said once; the directory may still be opened to us
        log.error("%s", denied)
        status.set_phase(denied)
    if not watch.is_directory(plugin_dir):
        status.set_phase(f"waiting for the device-plugins directory {plugin_dir}")
        await watch.wait_for_directory(plugin_dir)
    async with watch.DirWatch(plugin_dir) as dw, asyncio.TaskGroup() as tg:
        running: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        async for live in holder.watch():
            wanted = {r.name: r for r in live.plan.resources}
            status.want(wanted)
            for name, (retire, task) in list(running.items()):
                if name not in wanted:
                    log.info("resource %s removed", name)
                    retire.set()
                    await asyncio.wait([task])
                    del running[name]
            for name, spec in sorted(wanted.items()):
                if name not in running:
                    retire = asyncio.Event()
                    coro = run_resource(spec, retire, dw, holder, registry, status)
                    running[name] = (retire, tg.create_task(coro, name=f"plugin-{name}"))
                    status.resource_started(name)
            status.applied_version(live.version)
    raise RuntimeError("the live holder's watch ended")


async def run_resource(
    spec: Resource,
    retire: asyncio.Event,
    dw: watch.DirWatch,
    holder: Holder,
    registry: DeviceRegistry,
    status: Status,
) -> None:
    """Generations of one resource's plugin until it is retired."""
    while not retire.is_set():
        config = holder.current().config
        kubelet = config.kubelet_socket
        if sockets.socket_inode(kubelet) is None:
            status.set_phase(f"waiting for the kubelet socket {kubelet}")
            log.info("waiting for the kubelet socket %s", kubelet)
            await aio.first_of(
                {
                    "kubelet": dw.wait(
                        lambda k=kubelet: sockets.socket_inode(k) is not None  # type: ignore[misc]
                    ),
                    "retire": retire.wait(),
                }
            )
            continue
        service = server.DevicePluginService(
            spec, registry, holder.current, status.changed, status.allocation_answered
        )
        status.generation_started(service)
        async with server.serve(
            service, config.socket_path(spec.name), shutdown_timeout=config.shutdown_timeout
        ) as plugin:
            mark = _KubeletMark.now(dw, kubelet)
            reason = await _generation(holder, service, plugin, mark, retire, status)
            status.generation_ended(service, reason)
        status.generation_closed(service)
        if retire.is_set():
            return
        # If the same kubelet lives on, let it process the end of our old stream before we
        # register again (kubelet-contract.md §2.5); a kubelet restart needs no pause.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.resettle_delay):
                await dw.wait(mark.changed)
        if reason == STREAM_LOST and not mark.changed():
            log.warning(  # a restarting kubelet ends our stream too: that is only INFO
                "the kubelet ended ListAndWatch for %s while it stayed up; registering again",
                spec.name,
                extra={"resource": spec.name},
            )


async def _generation(
    holder: Holder,
    service: server.DevicePluginService,
    plugin: server.PluginServer,
    mark: _KubeletMark,
    retire: asyncio.Event,
    status: Status,
) -> str:
    """Register the served plugin, then wait for the reason to start over; returns it."""
    config = holder.current().config

    def why_redo() -> str | None:
        if retire.is_set():
            return RETIRED
        if not plugin.socket_intact():
            return "our socket was removed"
        if mark.changed():
            return "kubelet.sock was re-created (kubelet restart)"
        return None

    async def sleep(delay: float) -> None:
        """A backoff wait that gives up at once when the kubelet or our socket changes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await aio.first_of(
                    {"dir": mark.dw.wait(lambda: why_redo() is not None), "retire": retire.wait()}
                )
        reason = why_redo()
        if reason is not None:
            raise _Restart(reason)
        service.expect_kubelet()  # the next attempt's dial-back is the one that counts

    restarted: list[str] = []

    async def registering() -> None:
        try:
            await reg.register(
                config.kubelet_socket,
                plugin.path.name,
                service.resource,
                server.OPTIONS,
                call_timeout=config.register_timeout,
                delays=config.register_backoff,
                sleep=sleep,
            )
        except _Restart as e:
            restarted.append(str(e))

    service.expect_kubelet()
    # A Register in flight is abandoned when kubelet.sock changes: the kubelet it went to
    # (one that accepted but never answered, say) is gone.
    first = await aio.first_of(
        {
            "registered": registering(),
            "changed": mark.dw.wait(lambda: why_redo() is not None),
            "retired": retire.wait(),
        }
    )
    if first != "registered":
        return why_redo() or RETIRED
    if restarted:
        return restarted[0]
    service.kubelet_registered()
    reason = why_redo()
    if reason is not None:
        return reason
    status.accepted(service.resource, (mark.inode, mark.events))
    first = await aio.first_of(
        {
            "changed": mark.dw.wait(lambda: why_redo() is not None),
            "retired": retire.wait(),
            "stream-lost": service.stream_lost.wait(),
            "stream-timeout": _opened_in_time(service, config.stream_open_timeout),
        }
    )
    return {
        "changed": why_redo() or "directory changed",
        "retired": RETIRED,
        "stream-lost": STREAM_LOST,
        "stream-timeout": "the kubelet never opened ListAndWatch",
    }[first]
