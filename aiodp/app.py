"""How the plugin is put together: the composition root (task tree, signals, exit codes).

Each subsystem is started by one call into its package: the GPU core (`gpus.startup`), the
device plugin (`deviceplugin.generations`), the operator's view (`ops.operator`, `ops.probes`),
per-node configs (`config.pernode`) and the DRA driver (`dra.driver`).

main(config)
├─ signals: SIGTERM/SIGINT -> stop (a second one removes our sockets and exits at once);
│           SIGHUP -> rediscover
└─ TaskGroup
   ├─ stop-waiter       raises _Shutdown
   ├─ probes            /metrics, /healthz, /readyz (when an address is set)
   └─ serve             async with backend (its exit bounded by the shutdown timeout):
      └─ TaskGroup
         ├─ plugins         generations.run_plugins: a task per resource
         │  └─ plugin-<resource> ...
         ├─ rediscover      live.run_rediscover: SIGHUP -> rediscover, reload the config
         ├─ health          health.run_health: probes -> registry
         ├─ health-events   health.run_health_events: XIDs -> registry
         ├─ config-watch    live.run_config_watch (with a config file)
         ├─ simulated-watch live.run_simulated_watch (simulated backend)
         ├─ device-metrics  health.run_device_metrics: GPU counters for /metrics
         ├─ pod-resources   podresources.Attribution.run (with the pod-resources socket)
         ├─ node-signals    nodesignals.run, after the first registration (with NODE_NAME)
         ├─ node-label-watch pernode.run_label_watch (with --config-dir and API access)
         └─ dra             driver.run_dra (with --dra): its sockets, slices and claims
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import aiodp
from aiodp.config import resolve as cfg
from aiodp.config.model import Config
from aiodp.deviceplugin import generations
from aiodp.gpus import health, live, mps, startup
from aiodp.gpus.backend import DeviceBackend
from aiodp.gpus.devices import DeviceRegistry
from aiodp.gpus.simulated import SimulatedBackend
from aiodp.kit import aio, metrics
from aiodp.kit.errors import BackendUnavailable, ConfigError, ListenError
from aiodp.ops import operator, probes
from aiodp.ops.status import Status

# Imported where they are used, not here (start-up time and RSS, make bench): the Kubernetes
# API client (lightkube, httpx2, anyio: 6 MiB, ~60 ms) only with API work, and then after the
# first registration unless the node's label must be read before it; NVML only without the
# simulated backend; DRA only with --dra.
if TYPE_CHECKING:
    from lightkube import AsyncClient


log = logging.getLogger(__name__)


class _Shutdown(Exception):
    """Raised by the stop-waiter: the one way the task tree ends on purpose."""


async def main(
    config: Config,
    *,
    backend: DeviceBackend | None = None,
    stop: asyncio.Event | None = None,
    status: Status | None = None,
) -> int:
    """Run the plugin until `stop` is set or a signal arrives; returns the exit code.

    `status` is the plugin's read-only record (the demo and the tests watch it).
    """
    stop = stop or asyncio.Event()
    status = status or Status()
    hup = asyncio.Event()
    code = 0
    log.info("aiodp %s starting; not at default: %s (every setting: DEBUG, /status)",
             aiodp.__version__, cfg.changed(config))  # fmt: skip
    log.debug("aiodp running with %s", cfg.effective(config))
    try:
        with _signals(stop, hup, status):
            await _run(config, backend, stop, status, hup)
    except* _Shutdown:
        log.info("stopped")
    except* BackendUnavailable as unavailable:
        for problem in _leaves(unavailable):
            log.error("cannot start the device backend: %s", problem)
        code = 1
    except* ListenError as listen_errors:
        for refused in _leaves(listen_errors):
            log.error("%s", refused)
        code = 1
    except* ConfigError as config_errors:
        for e in _leaves(config_errors):
            log.error("%s", e)
        code = 2
    except* Exception as fatal:
        for err in _leaves(fatal):
            log.critical("fatal: %r", err, exc_info=err)
        code = 1
    return code


def _leaves(group: BaseExceptionGroup[Any]) -> Iterator[BaseException]:
    """The exceptions inside nested task-group groups: one log line each."""
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


def _remove_our_sockets(status: Status) -> None:
    """Unlink the sockets of the live plan's resources (cheap; the kubelet sees us gone)."""
    now = status.live
    if now is None:
        return
    for resource in now.plan.resources:
        with contextlib.suppress(OSError):
            now.config.socket_path(resource.name).unlink()


@contextlib.contextmanager
def _signals(stop: asyncio.Event, hup: asyncio.Event, status: Status) -> Iterator[None]:
    """SIGTERM/SIGINT ask for a stop; a second one removes our sockets and exits at once.

    Where the loop cannot take signals (not the main thread), the caller owns them.
    """
    loop = asyncio.get_running_loop()
    hits = 0

    def on_signal(signum: int) -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            _remove_our_sockets(status)
            os._exit(128 + signum)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (RuntimeError, ValueError):  # not the main thread
            pass
    with contextlib.suppress(RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        installed.append(signal.SIGHUP)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _wait_stop(stop: asyncio.Event) -> NoReturn:
    await stop.wait()
    raise _Shutdown


async def _run(
    config: Config,
    given: DeviceBackend | None,
    stop: asyncio.Event,
    status: Status,
    hup: asyncio.Event,
) -> None:
    async with asyncio.TaskGroup() as tg:
        status.eternal_task(tg.create_task(_wait_stop(stop), name="stop-waiter"))
        if config.metrics_address:
            loop = asyncio.get_running_loop()
            checks = probes.Probes(
                liveness=lambda: status.liveness(
                    loop.time(), config.health_interval, config.health_policy.probes
                ),
                readiness=status.readiness,
                status=status.snapshot,
            )
            bound: asyncio.Future[probes.Endpoint] = loop.create_future()
            status.eternal_task(
                tg.create_task(
                    probes.run_probes(config.metrics_address, checks, bound), name="probes"
                )
            )
            status.bound(await bound)
        status.eternal_task(tg.create_task(_serve(config, given, status, hup), name="serve"))


async def _serve(
    config: Config, given: DeviceBackend | None, status: Status, hup: asyncio.Event
) -> NoReturn:
    async with contextlib.AsyncExitStack() as stack:
        status.set_phase("starting the device backend")
        backend = await startup.enter_backend(config, given, stack)
        if isinstance(backend, SimulatedBackend):
            metrics.set_backend_state("simulated", True)
            stack.callback(metrics.set_backend_state, "simulated", False)
        status.set_phase("discovering devices")
        api: AsyncClient | None = None
        label: str | None = None
        if config.config_dir is not None and config.node_name:
            from aiodp.config import pernode  # the label decides the first registration

            api, label = await pernode.first_label(config)
            if api is not None:
                stack.push_async_callback(api.close)
            if label is not None:
                config = pernode.with_label(config, label)
        infos, first = await live.discover(backend, config)
        log.info(
            "discovered %d GPU(s): %s", len(infos), ", ".join(f"{g.index}={g.uuid}" for g in infos)
        )
        cfg.warn_unknown(config)
        for ignored in config.ignored:
            log.info("config file: %s is accepted and ignored by aiodp", ignored)
        for note in config.notes:
            log.warning("%s", note)
        registry = DeviceRegistry(first.plan.devices)
        holder = live.Holder(first)
        tracker = health.HealthTracker(
            registry, recovery_period=config.health_recovery_period, policy=config.health_policy
        )
        status.serving(holder, lambda: tracker.last_probe, registry)
        status.set_phase("registering with the kubelet")
        mps.check(config, backend)  # ConfigError: exit 2, naming what is missing
        reloader = live.Reloader(
            holder, infos, backend, registry, tracker, status.reloaded,
            withdraw=lambda gpus: status.wait_withdrawn(gpus, config.stream_open_timeout),
            check=lambda new: mps.check(new, backend),
        )  # fmt: skip
        daemons = mps.Supervisor(holder, backend, tracker.hold)
        await daemons.start()  # an MPS resource is Healthy only once its daemon answers
        tasks: aio.Tasks = [
            ("plugins", generations.run_plugins(holder, registry, status)),
            *startup.tasks(config, backend, reloader, tracker, hup),
            ("mps", mps.run(daemons, interval=config.health_interval)),
            *operator.tasks(config, backend, infos, registry, holder, status, api, stack),
        ]
        if api is not None:
            from aiodp.config import pernode  # imported already: the label was read at start

            watch_label = pernode.run_label_watch(api, config, label, reloader.select_config)
            tasks.append(("node-label-watch", watch_label))
        if config.dra:
            from aiodp.dra import driver  # DRA: only with --dra

            tasks.append(("dra", driver.start(holder, registry, api, status, stack, daemons)))
        async with asyncio.TaskGroup() as tg:
            for name, coro in tasks:
                status.eternal_task(tg.create_task(coro, name=name))
    raise RuntimeError("the task tree ended")
