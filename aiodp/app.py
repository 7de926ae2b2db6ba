"""How the plugin runs: one event loop, one task tree, plugin generations, bounded shutdown.

main(config)
├─ signals: SIGTERM/SIGINT -> stop; a second one exits at once
└─ async with backend:
    └─ TaskGroup
       ├─ health           probes -> registry
       ├─ plugins          generations: serve -> register -> wait for a reason to redo
       ├─ simulated-watch  (simulated backend) file edits -> reload -> health
       └─ stop-waiter      raises _Shutdown
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from aiodp import health, metrics, probes, retry, server, sharing, watch
from aiodp import registration as reg
from aiodp.backend import DeviceBackend
from aiodp.config import RESOURCE_GPU, Config
from aiodp.devices import DeviceRegistry
from aiodp.errors import BackendUnavailable, ConfigError
from aiodp.nvml import NvmlBackend
from aiodp.simulated import SimulatedBackend
from aiodp.topology import Topology

log = logging.getLogger(__name__)


class _Shutdown(Exception):
    """Raised by the stop-waiter: the one way the task tree ends on purpose."""


class _Restart(Exception):
    """A registration attempt is moot: the kubelet or our socket changed under it."""


@dataclass
class State:
    """What the running plugin knows about itself; read by the demo and by tests."""

    generation: int = 0
    registered: bool = False
    registrations: int = 0
    reasons: list[str] = field(default_factory=list)
    """Why each earlier generation ended, oldest first."""
    phase: str = "starting"
    """What the plugin is doing while not ready, for /readyz."""
    service: server.DevicePluginService | None = None
    eternal: list[asyncio.Task[Any]] = field(default_factory=list)
    """Tasks that must never end while the plugin runs, for /healthz."""
    tracker: health.HealthTracker | None = None
    endpoint: probes.Endpoint | None = None
    """Where /metrics, /healthz and /readyz are served, once bound."""
    last_registration: tuple[int | None, int] | None = None
    """kubelet.sock's (inode, event count) at our last registration: a new kubelet differs."""
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds; re-checked whenever the state changes."""
        while True:
            changed = self._changed
            if condition():
                return
            await changed.wait()

    def readiness(self) -> str | None:
        """None when every resource is registered and its ListAndWatch stream is open."""
        if not self.registered:
            return self.phase
        if self.service is None or not self.service.open_streams:
            return (
                f"registered {self.service.resource if self.service else ''}, but no "
                "ListAndWatch stream is open"
            )
        return None


def liveness(state: State, config: Config, loop: asyncio.AbstractEventLoop) -> str | None:
    """None while every eternal task runs and health probes keep coming."""
    dead = [t.get_name() for t in state.eternal if t.done()]
    if dead:
        return f"task(s) ended: {', '.join(dead)}"
    tracker = state.tracker
    if tracker is not None and tracker.last_probe is not None and config.health_policy.probes:
        stalled = loop.time() - tracker.last_probe
        if stalled > 3 * config.health_interval + 30:
            return f"no health probe for {stalled:.0f} s"
    return None


def _inode(path: Path) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


async def _first(waits: dict[str, Coroutine[Any, Any, object]]) -> str:
    """Run the waits side by side; return the name of the first to finish, cancel the rest.

    The losers are cancelled by hand rather than by raising out of the TaskGroup: on
    Python 3.11 a child's exception raised while the parent waits in the group's exit
    leaves the parent marked as cancelling, which later turns timeouts into cancellations.
    """
    winners: list[str] = []
    done = asyncio.Event()

    async def run(name: str, wait: Coroutine[Any, Any, object]) -> None:
        await wait
        winners.append(name)
        done.set()

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(run(n, w), name=f"wait-{n}") for n, w in waits.items()]
        await done.wait()
        for task in tasks:
            task.cancel()
    return winners[0]


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
        return cls(dw, path, dw.seen([path.name]), _inode(path))

    def changed(self) -> bool:
        """kubelet.sock was deleted or created since, or is another file now."""
        return self.dw.seen([self.path.name]) != self.events or _inode(self.path) != self.inode


async def run_plugins(
    config: Config,
    registry: DeviceRegistry,
    topo: Callable[[], Topology],
    control_paths: Sequence[str],
    *,
    ready: asyncio.Event,
    state: State,
) -> NoReturn:
    """Plugin generations: serve, register once per kubelet, redo when something breaks it.

    A generation ends when our socket is deleted or replaced, when kubelet.sock changes
    (a kubelet restart: seen by inotify events and by its inode), when the kubelet ends
    our ListAndWatch stream, or when it never opens one after Register. Leaving the
    `serve` block ends our streams, closes the server and removes our socket first.
    """
    kubelet = config.kubelet_socket
    resource = RESOURCE_GPU
    path = config.socket_path(resource)
    async with watch.DirWatch(config.plugin_dir) as dw:
        while True:
            if _inode(kubelet) is None:
                state.phase = f"waiting for the kubelet socket {kubelet}"
                log.info("waiting for the kubelet socket %s", kubelet)
                await dw.wait(lambda: _inode(kubelet) is not None)
            state.generation += 1
            service = server.DevicePluginService(resource, registry, config, topo(), control_paths)
            state.service = service
            state.phase = f"registering {resource} with the kubelet"
            async with server.serve(
                service, path, shutdown_timeout=config.shutdown_timeout
            ) as plugin:
                mark = _KubeletMark.now(dw, kubelet)
                reason = await _generation(config, service, plugin, mark, ready, state)
                state.registered = False
                state.phase = f"re-registering: {reason}"
                state.reasons.append(reason)
                state.notify()
                log.info(
                    "plugin generation %d ends: %s",
                    state.generation,
                    reason,
                    extra={"generation": state.generation, "resource": resource},
                )
            # If the same kubelet lives on, let it process the end of our old stream before we
            # register again (kubelet-contract.md §2.5); a kubelet restart needs no pause.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.resettle_delay):
                    await dw.wait(mark.changed)


async def _generation(
    config: Config,
    service: server.DevicePluginService,
    plugin: server.PluginServer,
    mark: _KubeletMark,
    ready: asyncio.Event,
    state: State,
) -> str:
    """Register the served plugin, then wait for the reason to start over; returns it."""

    def why_redo() -> str | None:
        if not plugin.socket_intact():
            return "our socket was removed"
        if mark.changed():
            return "kubelet.sock was re-created (kubelet restart)"
        return None

    async def sleep(delay: float) -> None:
        """A backoff wait that gives up at once when the kubelet or our socket changes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await mark.dw.wait(lambda: why_redo() is not None)
        reason = why_redo()
        if reason is not None:
            raise _Restart(reason)

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
        return str(e)
    reason = why_redo()
    if reason is not None:
        return reason
    seen = (mark.inode, mark.events)
    if state.last_registration is not None and seen != state.last_registration:
        metrics.observe_kubelet_restart()  # kubelet.sock is another file than last time
    state.last_registration = seen
    state.registrations += 1
    state.registered = True
    state.notify()
    ready.set()
    first = await _first(
        {
            "changed": mark.dw.wait(lambda: why_redo() is not None),
            "stream-lost": service.stream_lost.wait(),
            "stream-timeout": _opened_in_time(service, config.stream_open_timeout),
        }
    )
    return {
        "changed": why_redo() or "directory changed",
        "stream-lost": "the kubelet ended ListAndWatch",
        "stream-timeout": "the kubelet never opened ListAndWatch",
    }[first]


async def run_simulated_watch(
    backend: SimulatedBackend, registry: DeviceRegistry, health_wake: asyncio.Event
) -> NoReturn:
    """Every edit of the simulated-devices file: reload it, then probe health at once."""
    async for _ in watch.file_changes(backend.path):
        if not await backend.reload():
            continue
        fresh = sharing.advertised(await backend.discover())
        current = {d.id: d for d in registry.inventory().devices}
        if {d.id for d in fresh} != set(current):
            log.info("simulated devices: device list changed (%d devices)", len(fresh))
            registry.replace(fresh)
        health_wake.set()
    raise RuntimeError("the simulated-devices watch ended")


async def _wait_stop(stop: asyncio.Event) -> NoReturn:
    await stop.wait()
    raise _Shutdown


@contextlib.contextmanager
def _signals(stop: asyncio.Event) -> Any:
    loop = asyncio.get_running_loop()
    hits = 0

    def on_signal(signum: int) -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (RuntimeError, ValueError):  # not the main thread: the caller owns signals
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def main(
    config: Config,
    *,
    backend: DeviceBackend | None = None,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    state: State | None = None,
    handle_signals: bool = True,
) -> int:
    """Run the plugin until `stop` is set or a signal arrives; returns the exit code."""
    stop = stop or asyncio.Event()
    ready = ready or asyncio.Event()
    state = state or State()
    code = 0
    try:
        with _signals(stop) if handle_signals else contextlib.nullcontext():
            await _run(config, backend, stop, ready, state)
    except* _Shutdown:
        log.info("stopped")
    except* BackendUnavailable as unavailable:
        for problem in unavailable.exceptions:
            log.error("cannot start the device backend: %s", problem)
        code = 1
    except* ConfigError as config_errors:
        for e in config_errors.exceptions:
            log.error("%s", e)
        code = 2
    except* Exception as fatal:
        for err in fatal.exceptions:
            log.critical("fatal: %r", err, exc_info=err)
        code = 1
    return code


async def _enter_backend(
    config: Config, given: DeviceBackend | None, stack: contextlib.AsyncExitStack
) -> DeviceBackend:
    """Start the backend: the given one, the simulated file, or NVML.

    With `fail_on_init_error` false, a backend that cannot start is retried with backoff
    and nothing is registered meanwhile; otherwise its error ends the process.
    """
    backend: DeviceBackend
    if given is not None:
        backend = given
    elif config.backend == "simulated" and config.simulated_devices is not None:
        backend = SimulatedBackend(config.simulated_devices)
    else:
        backend = NvmlBackend(config)
        if config.backend == "auto" and config.simulated_devices is not None:
            try:
                return await stack.enter_async_context(backend)
            except BackendUnavailable as e:
                log.warning("NVML unavailable (%s); using the simulated devices", e)
                backend = SimulatedBackend(config.simulated_devices)
    if config.fail_on_init_error:
        return await stack.enter_async_context(backend)
    await retry.retrying(
        backend.__aenter__,
        delays=config.register_backoff,
        retry_on=(BackendUnavailable,),
        what="backend initialisation (nothing is registered until it succeeds)",
    )
    stack.push_async_exit(backend.__aexit__)
    return backend


async def _run(
    config: Config,
    given: DeviceBackend | None,
    stop: asyncio.Event,
    ready: asyncio.Event,
    state: State,
) -> None:
    async with asyncio.TaskGroup() as tg:
        stopper = tg.create_task(_wait_stop(stop), name="stop-waiter")
        state.eternal.append(stopper)
        if config.metrics_address:
            loop = asyncio.get_running_loop()
            checks = probes.Probes(
                liveness=lambda: liveness(state, config, loop), readiness=state.readiness
            )
            bound: asyncio.Future[probes.Endpoint] = loop.create_future()
            state.eternal.append(
                tg.create_task(
                    probes.run_probes(config.metrics_address, checks, bound), name="probes"
                )
            )
            state.endpoint = await bound
            state.notify()
        state.eternal.append(tg.create_task(_serve(config, given, ready, state), name="serve"))


async def _serve(
    config: Config, given: DeviceBackend | None, ready: asyncio.Event, state: State
) -> NoReturn:
    async with contextlib.AsyncExitStack() as stack:
        state.phase = "starting the device backend"
        backend = await _enter_backend(config, given, stack)
        if isinstance(backend, SimulatedBackend):
            metrics.set_backend_state("simulated", True)
            stack.callback(metrics.set_backend_state, "simulated", False)
        state.phase = "discovering devices"
        infos = await backend.discover()
        registry = DeviceRegistry(sharing.advertised(infos))
        metrics.set_device_source(
            lambda: [
                (
                    d.resource,
                    d.id,
                    d.health.value,
                    metrics.reason_class(d.reason) if d.reason else "",
                )
                for d in registry.inventory().devices
            ]
        )
        stack.callback(metrics.set_device_source, None)
        topo = await backend.topology()
        log.info(
            "discovered %d GPU(s): %s",
            len(infos),
            ", ".join(f"{g.index}={g.uuid}" for g in infos),
        )
        tracker = health.HealthTracker(registry, recovery_period=config.health_recovery_period)
        state.tracker = tracker
        health_wake = asyncio.Event()
        tasks: list[tuple[str, Coroutine[Any, Any, NoReturn]]] = [
            (
                "plugins",
                run_plugins(
                    config,
                    registry,
                    lambda: topo,
                    backend.control_paths(),
                    ready=ready,
                    state=state,
                ),
            ),
        ]
        if config.health_policy.probes:
            tasks.append(
                (
                    "health",
                    health.run_health(
                        backend, tracker, interval=config.health_interval, wake=health_wake
                    ),
                )
            )
        if config.health_policy.watches_xids:
            tasks.append(("health-events", health.run_health_events(backend, tracker)))
        if isinstance(backend, SimulatedBackend):
            tasks.append(("simulated-watch", run_simulated_watch(backend, registry, health_wake)))
        async with asyncio.TaskGroup() as tg:
            for name, coro in tasks:
                state.eternal.append(tg.create_task(coro, name=name))
    raise RuntimeError("the task tree ended")
