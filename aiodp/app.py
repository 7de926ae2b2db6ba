"""How the plugin is put together: the composition root (task tree, signals, exit codes).

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
         ├─ rediscover      reload.run_rediscover: SIGHUP -> rediscover, reload the config
         ├─ health          health.run_health: probes -> registry
         ├─ health-events   health.run_health_events: XIDs -> registry
         ├─ config-watch    reload.run_config_watch (with a config file)
         ├─ simulated-watch reload.run_simulated_watch (simulated backend)
         ├─ node-label-watch nodeconfig.run_label_watch (with --config-dir and API access)
         ├─ node-signals    nodesignals.run, after the first registration (with NODE_NAME)
         └─ dra             dra.run_dra (with --dra): its sockets, slices and claims
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import aiodp
from aiodp import config as cfg
from aiodp import (
    generations,
    health,
    metrics,
    podresources,
    probes,
    reload,
    retry,
)
from aiodp.backend import DeviceBackend, DeviceInfo, GpuMetrics
from aiodp.config import Config
from aiodp.devices import DeviceRegistry, Health
from aiodp.errors import BackendUnavailable, ConfigError, ListenError
from aiodp.simulated import SimulatedBackend
from aiodp.status import Status

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
    log.info("aiodp %s running with %s", aiodp.__version__, cfg.effective(config))
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
    live = status.live
    if live is None:
        return
    for resource in live.plan.resources:
        with contextlib.suppress(OSError):
            live.config.socket_path(resource.name).unlink()


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


async def _node_label(config: Config) -> tuple[AsyncClient | None, str | None]:
    """With --config-dir: the API client (None without access) and the node's label now."""
    if config.config_dir is None or not config.node_name:
        return None, None
    from aiodp import nodeconfig  # the label decides the first registration: needed now

    api = nodeconfig.client(config)
    if api is None:
        return None, None
    return api, await nodeconfig.read_label(api, config)


def _with_label(config: Config, label: str) -> Config:
    """The start-up config with the config the node's label names (ConfigError if none)."""
    path = cfg.labelled_config_path(config, label)
    if path == config.config_file:
        return config
    log.info("node label %s=%s: config %s", config.node_label, label, path)
    return cfg.with_labelled_config(config, path)


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


def _choose_backend(config: Config) -> DeviceBackend:
    if config.backend == "simulated" and config.simulated_devices is not None:
        return SimulatedBackend(config.simulated_devices, max_bytes=config.max_file_bytes)
    from aiodp.nvml import NvmlBackend  # pynvml: 2 MiB a simulated node does not need

    return NvmlBackend(sys_root=config.sys_root, proc_root=config.proc_root)


async def _enter_backend(
    config: Config, given: DeviceBackend | None, stack: contextlib.AsyncExitStack
) -> DeviceBackend:
    """Start the backend: the given one, the simulated file, or NVML.

    With `fail_on_init_error` false, a backend that cannot start is retried with backoff
    and nothing is registered meanwhile; otherwise its error ends the process. Its exit is
    bounded by the shutdown timeout (the NVML event thread and nvmlShutdown can hang).
    """
    backend = given if given is not None else _choose_backend(config)
    if (
        given is None
        and not isinstance(backend, SimulatedBackend)
        and config.backend == "auto"
        and config.simulated_devices is not None
    ):
        try:
            await backend.__aenter__()
        except BackendUnavailable as e:
            log.warning("NVML unavailable (%s); using the simulated devices", e)
            backend = SimulatedBackend(config.simulated_devices, max_bytes=config.max_file_bytes)
        else:
            stack.push_async_callback(_bounded_exit, backend, config.shutdown_timeout)
            return backend
    if config.fail_on_init_error:
        await backend.__aenter__()
    else:
        await retry.retrying(
            backend.__aenter__,
            delays=config.register_backoff,
            retry_on=(BackendUnavailable,),
            what="backend initialisation (nothing is registered until it succeeds)",
        )
    stack.push_async_callback(_bounded_exit, backend, config.shutdown_timeout)
    return backend


async def _bounded_exit(backend: DeviceBackend, within: float) -> None:
    try:
        async with asyncio.timeout(within):
            await backend.__aexit__(None, None, None)
    except TimeoutError:
        log.warning("the device backend did not shut down within %.1f s; leaving it", within)


def _device_metrics(
    config: Config,
    backend: DeviceBackend,
    infos: Sequence[DeviceInfo],
    registry: DeviceRegistry,
    status: Status,
    stack: contextlib.AsyncExitStack,
) -> list[tuple[str, Coroutine[Any, Any, NoReturn]]]:
    """The GPU counters on /metrics, labelled by the pods holding each GPU when the kubelet's
    pod-resources socket answers."""
    latest: dict[str, Mapping[str, object]] = {}
    gpus = {g.uuid: g for g in infos}
    migs = {m.uuid: (g, m) for g in infos for m in g.mig_devices}

    def keep(reading: Mapping[str, GpuMetrics]) -> None:
        latest.clear()
        latest.update({u: dataclasses.asdict(m) for u, m in reading.items()})

    def physical(resource: str, device_id: str) -> str | None:
        d = registry.get(device_id)
        return d.uuid if d is not None and d.resource == resource else None

    pods = None
    if config.pod_resources_socket is not None:
        pods = podresources.Attribution(config.pod_resources_socket, physical)

    def rows() -> list[metrics.GpuRow]:
        out: list[metrics.GpuRow] = []
        holders = pods.holders if pods is not None else {}
        for u, values in sorted(latest.items()):
            if u in gpus:
                g = gpus[u]
                base = {"gpu": str(g.index), "UUID": u, "modelName": g.name,
                        "GPU_I_ID": "", "GPU_I_PROFILE": ""}  # fmt: skip
                # a GPU in MIG mode is held through its MIG devices
                mine = [h for x in (u, *(m.uuid for m in g.mig_devices))
                        for h in holders.get(x, ())]  # fmt: skip
            elif u in migs:
                g, m = migs[u]
                base = {"gpu": str(g.index), "UUID": g.uuid, "modelName": g.name,
                        "GPU_I_ID": str(m.gi), "GPU_I_PROFILE": m.profile}  # fmt: skip
                mine = list(holders.get(u, ()))
            else:
                continue
            held = sorted({(h.pod, h.namespace, h.container) for h in mine})
            if len(held) > podresources.MAX_LABELLED_HOLDERS:
                held = []  # widely shared: once, unlabelled (aiodp_pod_devices names them)
            for pod, namespace, container in held or [("", "", "")]:
                labels = {**base, "pod": pod, "namespace": namespace, "container": container}
                out.append((labels, values))
        return out

    status.reading(lambda: latest)
    metrics.set_gpu_source(rows)
    stack.callback(metrics.set_gpu_source, None)
    reading = health.run_device_metrics(
        backend, interval=config.device_metrics_interval, on_reading=keep
    )
    tasks: list[tuple[str, Coroutine[Any, Any, NoReturn]]] = [("device-metrics", reading)]
    if pods is not None:
        attribution = pods

        def pod_rows() -> list[metrics.PodRow]:
            out = []
            for held in attribution.holders.values():
                for h in held:
                    d = registry.get(h.device)
                    healthy = d is not None and d.health is Health.HEALTHY
                    out.append((h.namespace, h.pod, h.container, h.resource, healthy))
            return out

        metrics.set_pod_source(pod_rows)
        stack.callback(metrics.set_pod_source, None)
        status.attributing(
            lambda: {
                h.device: f"{h.namespace}/{h.pod}/{h.container}"
                for held in attribution.holders.values()
                for h in held
            },
            attribution.on_allocate,
        )
        tasks.append(("pod-resources", attribution.run(interval=config.device_metrics_interval)))
    return tasks


async def _node_signals(
    config: Config, api: AsyncClient | None, registry: DeviceRegistry, status: Status
) -> NoReturn:
    """The node condition and Events on GPU faults, once the plugin has registered (or
    --stream-open-timeout has passed): the API client's import and first call stay off the
    start-up path. Without API access: one line, and nothing more to do."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(config.stream_open_timeout):
            await status.ready.wait()
    from aiodp import nodeconfig, nodesignals  # lightkube: after registration (start-up time)

    own = api is None
    if api is None:
        api = nodeconfig.client(config, without="GPU faults reach no node condition or Event")
    if api is None:
        await asyncio.Event().wait()  # nothing to signal with; the task tree keeps its shape
    assert api is not None
    try:
        signals = nodesignals.NodeSignals(
            api, config.node_name, nodesignals.boot_id(config.proc_root), config.api_timeout
        )
        await nodesignals.run(signals, registry)
    finally:
        if own:
            await api.close()


def _dra(
    config: Config,
    api: AsyncClient | None,
    holder: reload.Holder,
    registry: DeviceRegistry,
    status: Status,
    stack: contextlib.AsyncExitStack,
) -> Coroutine[Any, Any, NoReturn]:
    """The DRA driver's task, with its own API client where the node-label one is absent."""
    from aiodp import dra, nodeconfig  # DRA and its API client: only with --dra

    if api is None and config.node_name:
        api = nodeconfig.client(config, without="no ResourceSlices are published")
        if api is not None:
            stack.push_async_callback(api.close)
    status.dra_serving(config.dra_driver_name)
    return dra.run_dra(holder, registry, api, status)


async def _serve(
    config: Config, given: DeviceBackend | None, status: Status, hup: asyncio.Event
) -> NoReturn:
    async with contextlib.AsyncExitStack() as stack:
        status.set_phase("starting the device backend")
        backend = await _enter_backend(config, given, stack)
        if isinstance(backend, SimulatedBackend):
            metrics.set_backend_state("simulated", True)
            stack.callback(metrics.set_backend_state, "simulated", False)
        status.set_phase("discovering devices")
        api, label = await _node_label(config)
        if api is not None:
            stack.push_async_callback(api.close)
        if label is not None:
            config = _with_label(config, label)
        infos, live = await reload.discover(backend, config)
        log.info(
            "discovered %d GPU(s): %s", len(infos), ", ".join(f"{g.index}={g.uuid}" for g in infos)
        )
        for ignored in config.ignored:
            log.info("config file: %s is accepted and ignored by aiodp", ignored)
        for note in config.notes:
            log.warning("%s", note)
        registry = DeviceRegistry(live.plan.devices)
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
        metrics.set_task_source(lambda: len(asyncio.all_tasks()))
        stack.callback(metrics.set_task_source, None)
        holder = reload.Holder(live)
        tracker = health.HealthTracker(
            registry, recovery_period=config.health_recovery_period, policy=config.health_policy
        )
        status.serving(holder, lambda: tracker.last_probe, registry)
        status.set_phase("registering with the kubelet")
        reloader = reload.Reloader(
            holder, infos, backend, registry, tracker, status.reloaded,
            withdraw=lambda gpus: status.wait_withdrawn(gpus, config.stream_open_timeout),
        )  # fmt: skip
        health_wake = asyncio.Event()
        tasks: list[tuple[str, Coroutine[Any, Any, NoReturn]]] = [
            ("plugins", generations.run_plugins(holder, registry, status)),
            ("rediscover", reload.run_rediscover(reloader, hup)),
        ]
        if config.health_policy.probes:
            probe = health.run_health(
                backend, tracker, interval=config.health_interval, wake=health_wake
            )
            tasks.append(("health", probe))
        if config.device_metrics_interval > 0:
            tasks += _device_metrics(config, backend, infos, registry, status, stack)
        if config.health_policy.watches_xids:
            tasks.append(("health-events", health.run_health_events(backend, tracker)))
        if config.config_file is not None:
            tasks.append(("config-watch", reload.run_config_watch(reloader)))
        if isinstance(backend, SimulatedBackend):
            tasks.append(
                ("simulated-watch", reload.run_simulated_watch(backend, reloader, health_wake))
            )
        if config.node_signals and config.node_name:
            tasks.append(("node-signals", _node_signals(config, api, registry, status)))
        if api is not None:
            from aiodp import nodeconfig  # imported already: the label was read at start

            watch_label = nodeconfig.run_label_watch(api, config, label, reloader.select_config)
            tasks.append(("node-label-watch", watch_label))
        if config.dra:
            tasks.append(("dra", _dra(config, api, holder, registry, status, stack)))
        async with asyncio.TaskGroup() as tg:
            for name, coro in tasks:
                status.eternal_task(tg.create_task(coro, name=name))
    raise RuntimeError("the task tree ended")
