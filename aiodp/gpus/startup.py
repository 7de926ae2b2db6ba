"""How the GPU core starts: the backend (given, simulated or NVML, retried or fatal), and the
tasks that keep the plan and the health current."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiodp.config.model import Config
from aiodp.gpus import health, live
from aiodp.gpus.backend import DeviceBackend
from aiodp.gpus.simulated import SimulatedBackend
from aiodp.kit import aio, retry
from aiodp.kit.errors import BackendUnavailable

log = logging.getLogger(__name__)


def _choose_backend(config: Config) -> DeviceBackend:
    if config.backend == "simulated" and config.simulated_devices is not None:
        return SimulatedBackend(config.simulated_devices, max_bytes=config.max_file_bytes)
    from aiodp.gpus.nvml import NvmlBackend  # pynvml: 2 MiB a simulated node does not need

    return NvmlBackend(sys_root=config.sys_root, proc_root=config.proc_root)


async def enter_backend(
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


def tasks(
    config: Config,
    backend: DeviceBackend,
    reloader: live.Reloader,
    tracker: health.HealthTracker,
    hup: asyncio.Event,
) -> aio.Tasks:
    """The core's eternal tasks: SIGHUP's rediscovery, health probes and XID events, and the
    config file's and simulated file's watches, as the config asks for them."""
    wake = asyncio.Event()
    out: aio.Tasks = [("rediscover", live.run_rediscover(reloader, hup))]
    if config.health_policy.probes:
        out.append(
            ("health", health.run_health(backend, tracker, interval=config.health_interval,
                                         wake=wake))
        )  # fmt: skip
    if config.health_policy.watches_xids:
        out.append(("health-events", health.run_health_events(backend, tracker)))
    if config.config_file is not None:
        out.append(("config-watch", live.run_config_watch(reloader)))
    if isinstance(backend, SimulatedBackend):
        out.append(("simulated-watch", live.run_simulated_watch(backend, reloader, wake)))
    return out
