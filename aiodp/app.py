"""How the plugin runs: one event loop, one task tree, plugin generations, bounded shutdown.

main(config)
├─ signals: SIGTERM/SIGINT -> stop (a second one exits at once); SIGHUP -> rediscover
└─ TaskGroup
   ├─ stop-waiter       raises _Shutdown
   ├─ probes            /metrics, /healthz, /readyz (when an address is set)
   └─ serve             async with backend:
      └─ TaskGroup
         ├─ plugins         one task per resource: serve -> register -> redo on need
         │  └─ plugin-<resource> ...
         ├─ health          probes -> registry
         ├─ health-events   XIDs -> registry
         ├─ config-watch    (with a config file) edits -> a new plan, applied live
         ├─ rediscover      SIGHUP -> rediscover devices, reload the config
         └─ simulated-watch (simulated backend) file edits -> reload -> health
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import aiofiles

from aiodp import config as cfg
from aiodp import health, metrics, probes, retry, server, sharing, watch
from aiodp import registration as reg
from aiodp.backend import DeviceBackend
from aiodp.config import Config
from aiodp.devices import DeviceRegistry, Health, Resource
from aiodp.errors import BackendUnavailable, ConfigError
from aiodp.nvml import NvmlBackend
from aiodp.simulated import SimulatedBackend
from aiodp.topology import Topology

log = logging.getLogger(__name__)


class _Shutdown(Exception):
    """Raised by the stop-waiter: the one way the task tree ends on purpose."""


class _Restart(Exception):
    """A registration attempt is moot: the kubelet or our socket changed under it."""


class _Pulse:
    """Wakes everyone waiting at the time of `notify()`; waiters re-check a condition."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while True:
            event = self._event
            if condition():
                return
            await event.wait()


@dataclass
class Live:
    """What the plugin serves now; replaced as a whole by a reload or a rediscovery."""

    config: Config
    plan: sharing.Plan
    topo: Topology
    control_paths: tuple[str, ...]
    version: int = 0


@dataclass
class State:
    """What the running plugin knows about itself; read by probes, the demo and tests."""

    generation: int = 0
    """Plugin generations started, over all resources."""
    registrations: int = 0
    reasons: list[str] = field(default_factory=list)
    """Why each earlier generation ended, oldest first."""
    phase: str = "starting"
    """What the plugin is doing before it serves, for /readyz."""
    wanted: tuple[str, ...] = ()
    """The resources the current plan advertises."""
    services: dict[str, server.DevicePluginService] = field(default_factory=dict)
    registered_resources: set[str] = field(default_factory=set)
    eternal: list[asyncio.Task[Any]] = field(default_factory=list)
    """Tasks that must never end while the plugin runs, for /healthz."""
    tracker: health.HealthTracker | None = None
    endpoint: probes.Endpoint | None = None
    """Where /metrics, /healthz and /readyz are served, once bound."""
    live: Live | None = None
    reloads: list[str] = field(default_factory=list)
    """Config reload results (applied, rejected, unchanged), oldest first."""
    last_registration: tuple[int | None, int] | None = None
    """kubelet.sock's (inode, event count) at our last registration: a new kubelet differs."""
    _pulse: _Pulse = field(default_factory=_Pulse, repr=False)

    @property
    def registered(self) -> bool:
        """Every advertised resource is registered with the kubelet."""
        return bool(self.wanted) and set(self.wanted) <= self.registered_resources

    def notify(self) -> None:
        self._pulse.notify()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds; re-checked whenever the state changes."""
        await self._pulse.wait_for(condition)

    def readiness(self) -> str | None:
        """None when every resource is registered and its ListAndWatch stream is open."""
        if not self.wanted:
            return self.phase
        for name in self.wanted:
            if name not in self.registered_resources:
                return f"{name}: not registered with the kubelet ({self.phase})"
            service = self.services.get(name)
            if service is None or not service.open_streams:
                return f"{name}: registered, but no ListAndWatch stream is open"
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
        return cls(dw, path, dw.seen([path.name]), server.socket_inode(path))

    def changed(self) -> bool:
        """kubelet.sock was deleted or created since, or is another file now."""
        return (
            self.dw.seen([self.path.name]) != self.events
            or server.socket_inode(self.path) != self.inode
        )


async def run_plugins(
    live: Callable[[], Live],
    changed: _Pulse,
    registry: DeviceRegistry,
    *,
    ready: asyncio.Event,
    state: State,
) -> NoReturn:
    """One plugin task per advertised resource, kept in step with the live plan.

    A new plan leaves unchanged resources alone (their servers and streams stay; they only
    see the new settings), retires removed or changed ones (streams end, socket removed)
    and starts the new ones, each registering on its own.
    """
    first = live()
    async with watch.DirWatch(first.config.plugin_dir) as dw, asyncio.TaskGroup() as tg:
        running: dict[str, tuple[Resource, asyncio.Event, asyncio.Task[None]]] = {}
        seen = -1
        while True:
            await changed.wait_for(lambda v=seen: live().version != v)  # type: ignore[misc]
            now = live()
            seen = now.version
            wanted = {r.name: r for r in now.plan.resources}
            state.wanted = tuple(sorted(wanted))
            for name, (spec, retire, task) in list(running.items()):
                if wanted.get(name) != spec:
                    log.info("resource %s %s", name, "changed" if name in wanted else "removed")
                    retire.set()
                    await asyncio.wait([task])
                    del running[name]
            for service in state.services.values():
                service.config, service.topo = now.config, now.topo
                service.control_paths = now.control_paths
            for name, spec in sorted(wanted.items()):
                if name not in running:
                    retire = asyncio.Event()
                    coro = run_resource(spec, retire, dw, live, registry, ready=ready, state=state)
                    running[name] = (spec, retire, tg.create_task(coro, name=f"plugin-{name}"))
            state.notify()


async def run_resource(
    spec: Resource,
    retire: asyncio.Event,
    dw: watch.DirWatch,
    live: Callable[[], Live],
    registry: DeviceRegistry,
    *,
    ready: asyncio.Event,
    state: State,
) -> None:
    """Generations of one resource's plugin until it is retired.

    A generation ends when our socket is deleted or replaced, when kubelet.sock changes
    (a kubelet restart: seen by inotify events and by its inode), when the kubelet ends
    our ListAndWatch stream, or never opens one after Register. Leaving the `serve`
    block ends our streams, closes the server and removes our socket first.
    """
    resource = spec.name
    while not retire.is_set():
        now = live()
        kubelet = now.config.kubelet_socket
        if server.socket_inode(kubelet) is None:
            state.phase = f"waiting for the kubelet socket {kubelet}"
            log.info("waiting for the kubelet socket %s", kubelet)
            await _first(
                {
                    "kubelet": dw.wait(
                        lambda k=kubelet: server.socket_inode(k) is not None  # type: ignore[misc]
                    ),
                    "retire": retire.wait(),
                }
            )
            continue
        state.generation += 1
        service = server.DevicePluginService(
            spec, registry, now.config, now.topo, now.control_paths, on_change=state.notify
        )
        state.services[resource] = service
        path = now.config.socket_path(resource)
        async with server.serve(
            service, path, shutdown_timeout=now.config.shutdown_timeout
        ) as plugin:
            mark = _KubeletMark.now(dw, kubelet)
            reason = await _generation(now.config, service, plugin, mark, retire, ready, state)
            state.registered_resources.discard(resource)
            state.phase = f"re-registering {resource}: {reason}"
            state.reasons.append(reason)
            state.notify()
            log.info(
                "plugin generation %d of %s ends: %s",
                state.generation,
                resource,
                reason,
                extra={"generation": state.generation, "resource": resource},
            )
        if state.services.get(resource) is service:
            del state.services[resource]
        if retire.is_set():
            return
        # If the same kubelet lives on, let it process the end of our old stream before we
        # register again (kubelet-contract.md §2.5); a kubelet restart needs no pause.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(now.config.resettle_delay):
                await dw.wait(mark.changed)


async def _generation(
    config: Config,
    service: server.DevicePluginService,
    plugin: server.PluginServer,
    mark: _KubeletMark,
    retire: asyncio.Event,
    ready: asyncio.Event,
    state: State,
) -> str:
    """Register the served plugin, then wait for the reason to start over; returns it."""

    def why_redo() -> str | None:
        if retire.is_set():
            return "the config no longer has it as it was"
        if not plugin.socket_intact():
            return "our socket was removed"
        if mark.changed():
            return "kubelet.sock was re-created (kubelet restart)"
        return None

    async def sleep(delay: float) -> None:
        """A backoff wait that gives up at once when the kubelet or our socket changes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await _first(
                    {"dir": mark.dw.wait(lambda: why_redo() is not None), "retire": retire.wait()}
                )
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
    state.registered_resources.add(service.resource)
    state.notify()
    if state.registered:
        ready.set()
    first = await _first(
        {
            "changed": mark.dw.wait(lambda: why_redo() is not None),
            "retired": retire.wait(),
            "stream-lost": service.stream_lost.wait(),
            "stream-timeout": _opened_in_time(service, config.stream_open_timeout),
        }
    )
    return {
        "changed": why_redo() or "directory changed",
        "retired": "the config no longer has it as it was",
        "stream-lost": "the kubelet ended ListAndWatch",
        "stream-timeout": "the kubelet never opened ListAndWatch",
    }[first]


def _shape(plan: sharing.Plan) -> tuple[object, ...]:
    """A plan without health: what decides whether servers must change."""
    devices = tuple(dataclasses.replace(d, health=Health.HEALTHY, reason="") for d in plan.devices)
    return (plan.resources, devices)


class Reconfigurer:
    """Builds a new plan (new config, rediscovered devices) and applies it in place."""

    def __init__(
        self,
        live: Live,
        backend: DeviceBackend,
        registry: DeviceRegistry,
        tracker: health.HealthTracker,
        changed: _Pulse,
        state: State,
    ) -> None:
        self.live = live
        self.backend = backend
        self.registry = registry
        self.tracker = tracker
        self.changed = changed
        self.state = state
        self.infos: Sequence[Any] = ()

    def current(self) -> Live:
        return self.live

    async def read_config(self) -> Config:
        """The running config with the config file's current content; raises ConfigError."""
        path = self.live.config.config_file
        if path is None:
            return self.live.config
        try:
            async with aiofiles.open(path, encoding="utf-8") as f:
                text = await f.read()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
        return cfg.reload(self.live.config, text)

    async def apply(self, config: Config, *, rediscover: bool) -> bool:
        """Install `config` (and fresh devices); False when nothing changed."""
        topo, control = self.live.topo, self.live.control_paths
        if rediscover:
            self.infos = await self.backend.discover()
            topo = await self.backend.topology()
            control = tuple(self.backend.control_paths())
        plan = sharing.plan(self.infos, config)
        if (config, _shape(plan), topo, control) == (
            self.live.config,
            _shape(self.live.plan),
            self.live.topo,
            self.live.control_paths,
        ):
            return False  # health alone is the health tasks' business
        health_of = {d.uuid: (d.health, d.reason) for d in self.registry.inventory().devices}
        devices = [
            dataclasses.replace(d, health=health_of[d.uuid][0], reason=health_of[d.uuid][1])
            if d.uuid in health_of
            else d
            for d in plan.devices
        ]
        self.live = Live(config, plan, topo, control, self.live.version + 1)
        self.state.live = self.live
        self.registry.replace(devices)
        self.tracker.reapply()
        log.info(
            "serving %s",
            ", ".join(
                f"{r.name} ({len([d for d in plan.devices if d.resource == r.name])})"
                for r in plan.resources
            )
            or "no resources",
        )
        self.changed.notify()
        return True

    def _reloaded(self, result: str) -> None:
        metrics.observe_config_reload(result)
        self.state.reloads.append(result)
        self.state.notify()

    async def reload_config(self) -> None:
        """A config file edit: apply it if valid, else keep the running config."""
        try:
            new = await self.read_config()
            applied = await self.apply(new, rediscover=False)
        except ConfigError as e:
            log.warning("config reload rejected, keeping the running config: %s", e)
            self._reloaded("rejected")
            return
        self._reloaded("applied" if applied else "unchanged")
        if applied:
            log.info("config reloaded from %s", new.config_file)


async def run_config_watch(reconf: Reconfigurer) -> NoReturn:
    """Every change of the config file (ConfigMap swaps included) -> reload it."""
    path = reconf.live.config.config_file
    assert path is not None
    async for _ in watch.file_changes(path):
        await reconf.reload_config()
    raise RuntimeError("the config watch ended")


async def run_rediscover(reconf: Reconfigurer, hup: asyncio.Event) -> NoReturn:
    """SIGHUP: rediscover the devices and reload the config file."""
    while True:
        await hup.wait()
        hup.clear()
        log.info("SIGHUP: rediscovering devices and reloading the config")
        try:
            new = await reconf.read_config()
        except ConfigError as e:
            log.warning("config reload rejected, keeping the running config: %s", e)
            metrics.observe_config_reload("rejected")
            new = reconf.live.config
        try:
            await reconf.apply(new, rediscover=True)
        except ConfigError as e:
            log.warning("rediscovery refused by the config: %s", e)


async def run_simulated_watch(
    backend: SimulatedBackend, reconf: Reconfigurer, health_wake: asyncio.Event
) -> NoReturn:
    """Every edit of the simulated-devices file: reload it, re-plan, probe health at once."""
    async for _ in watch.file_changes(backend.path):
        if not await backend.reload():
            continue
        try:
            await reconf.apply(reconf.live.config, rediscover=True)
        except ConfigError as e:
            log.warning("simulated devices: the new list does not fit the config: %s", e)
        health_wake.set()
    raise RuntimeError("the simulated-devices watch ended")


async def _wait_stop(stop: asyncio.Event) -> NoReturn:
    await stop.wait()
    raise _Shutdown


@contextlib.contextmanager
def _signals(stop: asyncio.Event, hup: asyncio.Event) -> Any:
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
    with contextlib.suppress(RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        installed.append(signal.SIGHUP)
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
    hup: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> int:
    """Run the plugin until `stop` is set or a signal arrives; returns the exit code."""
    stop = stop or asyncio.Event()
    ready = ready or asyncio.Event()
    state = state or State()
    hup = hup or asyncio.Event()
    code = 0
    try:
        with _signals(stop, hup) if handle_signals else contextlib.nullcontext():
            await _run(config, backend, stop, ready, state, hup)
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
    hup: asyncio.Event,
) -> None:
    async with asyncio.TaskGroup() as tg:
        state.eternal.append(tg.create_task(_wait_stop(stop), name="stop-waiter"))
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
        state.eternal.append(tg.create_task(_serve(config, given, ready, state, hup), name="serve"))


async def _serve(
    config: Config,
    given: DeviceBackend | None,
    ready: asyncio.Event,
    state: State,
    hup: asyncio.Event,
) -> NoReturn:
    async with contextlib.AsyncExitStack() as stack:
        state.phase = "starting the device backend"
        backend = await _enter_backend(config, given, stack)
        if isinstance(backend, SimulatedBackend):
            metrics.set_backend_state("simulated", True)
            stack.callback(metrics.set_backend_state, "simulated", False)
        state.phase = "discovering devices"
        infos = await backend.discover()
        log.info(
            "discovered %d GPU(s): %s",
            len(infos),
            ", ".join(f"{g.index}={g.uuid}" for g in infos),
        )
        for ignored in config.ignored:
            log.info("config file: %s is accepted and ignored by aiodp", ignored)
        plan = sharing.plan(infos, config)
        registry = DeviceRegistry(plan.devices)
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
        live = Live(config, plan, await backend.topology(), tuple(backend.control_paths()))
        state.live = live
        state.phase = "registering with the kubelet"
        tracker = health.HealthTracker(registry, recovery_period=config.health_recovery_period)
        state.tracker = tracker
        changed = _Pulse()
        reconf = Reconfigurer(live, backend, registry, tracker, changed, state)
        reconf.infos = infos
        health_wake = asyncio.Event()
        tasks: list[tuple[str, Coroutine[Any, Any, NoReturn]]] = [
            ("plugins", run_plugins(reconf.current, changed, registry, ready=ready, state=state)),
            ("rediscover", run_rediscover(reconf, hup)),
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
        if config.config_file is not None:
            tasks.append(("config-watch", run_config_watch(reconf)))
        if isinstance(backend, SimulatedBackend):
            tasks.append(("simulated-watch", run_simulated_watch(backend, reconf, health_wake)))
        async with asyncio.TaskGroup() as tg:
            for name, coro in tasks:
                state.eternal.append(tg.create_task(coro, name=name))
    raise RuntimeError("the task tree ended")
