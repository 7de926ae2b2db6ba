"""What the plugin serves now: the one live holder (config, plan, topology) and its watchers.

`Holder.current()` is read wherever a setting is needed (the gRPC services read it per
call); `Holder.watch()` hands the latest state after each change, skipping stale ones. A
`Reloader` is the only writer: a config file edit, SIGHUP and a simulated-devices edit each
build a new state and install it whole, or keep the running one when the new one is invalid.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from aiodp.config import resolve as cfg
from aiodp.config.model import Config
from aiodp.gpus import backend, cdi, health, sharing
from aiodp.gpus.backend import DeviceBackend, DeviceInfo
from aiodp.gpus.devices import DeviceRegistry, Health, Resource, imex_channel_path
from aiodp.gpus.simulated import SimulatedBackend
from aiodp.gpus.topology import Topology
from aiodp.kit import aio, watch
from aiodp.kit.errors import ConfigError, brief

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Live:
    """What the plugin serves now; replaced as a whole by a reload or a rediscovery."""

    config: Config
    plan: sharing.Plan
    topo: Topology
    control_paths: tuple[str, ...]
    """Shared control nodes (`/dev/nvidiactl`, ...) that exist under the live dev root."""
    imex_channels: tuple[int, ...] = ()
    """The configured IMEX channels whose device nodes exist under the live dev root."""
    cdi_missing: tuple[str, ...] = ()
    """CDI names Allocate hands out that no spec in --cdi-spec-dirs defines (CDI only)."""
    gpus: tuple[DeviceInfo, ...] = ()
    """The GPUs as discovered (what DRA publishes about each)."""
    version: int = 0

    def resource(self, name: str) -> Resource | None:
        """The resource's current definition (sharing, replicas), if it is still served."""
        return next((r for r in self.plan.resources if r.name == name), None)


class Holder:
    """The one live state: `current()` at any time, `watch()` for the latest after changes."""

    def __init__(self, live: Live) -> None:
        self._live = live
        self._pulse = aio.Pulse()

    def current(self) -> Live:
        return self._live

    def install(self, live: Live) -> None:
        """Replace the live state (a new version) and wake the watchers."""
        self._live = dataclasses.replace(live, version=self._live.version + 1)
        self._pulse.notify()

    async def next_after(self, version: int) -> Live:
        """The live state once its version is other than `version`."""
        await self._pulse.wait_for(lambda: self._live.version != version)
        return self._live

    async def watch(self) -> AsyncIterator[Live]:
        """The live state now, then the latest one after each change (stale ones skipped)."""
        seen = -1
        while True:
            await self._pulse.wait_for(lambda v=seen: self._live.version != v)  # type: ignore[misc]
            live = self._live
            seen = live.version
            yield live


async def discover(be: DeviceBackend, config: Config) -> tuple[Sequence[DeviceInfo], Live]:
    """Discover the devices and build a live state for `config` from them (version 0)."""
    infos = await be.discover()
    plan = sharing.plan(infos, config)
    control, imex = await device_nodes(config)
    missing = await cdi_missing(config, plan, imex)
    return infos, Live(config, plan, await be.topology(), control, imex, missing, tuple(infos))


async def cdi_missing(config: Config, plan: sharing.Plan, imex: Sequence[int]) -> tuple[str, ...]:
    """With a CDI strategy: the names we hand out that the node's specs lack (read in a
    thread), logged once per check with how to create the spec."""
    if not cdi.uses_cdi(config):
        return ()
    defined = await asyncio.to_thread(
        cdi.defined_names, config.cdi_spec_dirs, config.max_file_bytes
    )
    served = [d for d in plan.devices if not sharing.is_dra(d.resource)]
    missing = tuple(sorted(cdi.expected_names(served, config, imex) - defined))
    if missing:
        log.warning(
            "CDI device(s) %s are not defined by any spec in %s: containers asking for them "
            "will not start; create the spec with `nvidia-ctk cdi generate "
            "--output=/var/run/cdi/nvidia.yaml` (or install the GPU Operator)",
            brief(missing),
            ", ".join(str(d) for d in config.cdi_spec_dirs),
        )
    return missing


async def device_nodes(config: Config) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The control nodes and IMEX channels present under the dev root (stat calls, in a
    thread). A missing IMEX channel is a ConfigError with `imex.required`, else a warning."""
    control = await asyncio.to_thread(backend.control_paths, config.dev_root)
    imex = await asyncio.to_thread(backend.imex_channels, config.dev_root, config.imex_channel_ids)
    missing = sorted(set(config.imex_channel_ids) - set(imex))
    if missing:
        where = ", ".join(str(config.dev_root / imex_channel_path(c).lstrip("/")) for c in missing)
        if config.imex_required:
            raise ConfigError(f"imex.required: IMEX channel device node(s) missing: {where}")
        log.warning("IMEX channel(s) %s not found (%s): not handed to containers", missing, where)
    return control, imex


def _shape(plan: sharing.Plan) -> tuple[object, ...]:
    """A plan without health: what decides whether servers must change."""
    devices = tuple(dataclasses.replace(d, health=Health.HEALTHY, reason="") for d in plan.devices)
    return (plan.resources, devices)


class Reloader:
    """Builds a new live state (new config, rediscovered devices) and installs it."""

    def __init__(
        self,
        holder: Holder,
        infos: Sequence[DeviceInfo],
        be: DeviceBackend,
        registry: DeviceRegistry,
        tracker: health.HealthTracker,
        on_result: Callable[[str], None],
        withdraw: Callable[[frozenset[str]], Awaitable[None]] | None = None,
        check: Callable[[Config], None] = lambda _: None,
    ) -> None:
        self.holder = holder
        self.check = check
        """Refuses a config this node cannot serve (ConfigError), before anything changes."""
        self.withdraw = withdraw
        """Waits until neither API shows these GPUs (a GPU moving between the device plugin
        and DRA is withdrawn from one before it appears in the other)."""
        self.backend = be
        self.registry = registry
        self.tracker = tracker
        self.on_result = on_result
        """Told every reload's result: applied, rejected or unchanged."""
        self._infos = infos

    async def read_config(self) -> Config:
        """The running config with the config file's current content; raises ConfigError."""
        running = self.holder.current().config
        if running.config_file is None:
            return running
        file = await asyncio.to_thread(
            functools.partial(cfg.load, running.config_file, limit=running.max_file_bytes)
        )
        new = cfg.build(running.overrides, file, command=running.command, sources=running.sources)
        cfg.warn_unknown(new)
        return new

    async def apply(self, config: Config, *, rediscover: bool) -> bool:
        """Install `config` (and fresh devices); False when nothing changed."""
        self.check(config)
        old = self.holder.current()
        topo = old.topo
        if rediscover:
            self._infos = await self.backend.discover()
            topo = await self.backend.topology()
        plan = sharing.plan(self._infos, config)
        control, imex = old.control_paths, old.imex_channels
        if rediscover or (config.dev_root, config.imex_channel_ids, config.imex_required) != (
            old.config.dev_root,
            old.config.imex_channel_ids,
            old.config.imex_required,
        ):
            control, imex = await device_nodes(config)
        missing = await cdi_missing(config, plan, imex)  # specs may have come or gone
        if (config, _shape(plan), topo, control, imex, missing) == (
            old.config,
            _shape(old.plan),
            old.topo,
            old.control_paths,
            old.imex_channels,
            old.cdi_missing,
        ):
            return False  # health alone is the health tasks' business
        health_of = {d.uuid: (d.health, d.reason) for d in self.registry.inventory().devices}
        devices = [
            dataclasses.replace(d, health=health_of[d.uuid][0], reason=health_of[d.uuid][1])
            if d.uuid in health_of
            else d
            for d in plan.devices
        ]
        moving = _moving(old.plan, plan)
        if moving and self.withdraw is not None:  # first out of both APIs, then in
            log.info("GPU(s) %s move between the device plugin and DRA", brief(sorted(moving)))
            staying = [d for d in devices if d.gpu not in moving]
            interim = sharing.Plan(
                plan.resources, tuple(d for d in plan.devices if d.gpu not in moving)
            )
            self.holder.install(
                Live(config, interim, topo, control, imex, missing, tuple(self._infos))
            )
            self.registry.replace(staying)
            await self.withdraw(moving)
        self.holder.install(Live(config, plan, topo, control, imex, missing, tuple(self._infos)))
        self.registry.replace(devices)
        self.tracker.reapply()
        log.info("serving %s", describe(plan))
        return True

    async def select_config(self, label: str | None) -> None:
        """The node's config label changed: switch to the config it names (NVIDIA's
        config-manager rules); an unknown name is refused and the running config kept."""
        running = self.holder.current().config
        config_dir = running.config_dir
        if config_dir is None:
            return
        try:
            path = await asyncio.to_thread(cfg.labelled_config_path, running, label)
            new = await asyncio.to_thread(cfg.with_labelled_config, running, path)
            applied = await self.apply(new, rediscover=False)
        except ConfigError as e:
            log.warning("node config switch refused, keeping the running config: %s", e)
            self.on_result("rejected")
            return
        self.on_result("applied" if applied else "unchanged")
        if applied:
            log.info("config switched to %s (node label %s)", path or "none", label or "unset")

    async def reload_config(self) -> None:
        """A config file edit: apply it if valid, else keep the running config."""
        try:
            new = await self.read_config()
            applied = await self.apply(new, rediscover=False)
        except ConfigError as e:
            log.warning("config reload rejected, keeping the running config: %s", e)
            self.on_result("rejected")
            return
        self.on_result("applied" if applied else "unchanged")
        if applied:
            log.info("config reloaded from %s", new.config_file)


def _moving(old: sharing.Plan, new: sharing.Plan) -> frozenset[str]:
    """GPUs that change API (device plugin <-> DRA) from `old` to `new`."""

    def dra_gpus(plan: sharing.Plan) -> set[str]:
        return {d.gpu for d in plan.dra_devices()}

    def plugin_gpus(plan: sharing.Plan) -> set[str]:
        return {d.gpu for d in plan.devices if not sharing.is_dra(d.resource)}

    return frozenset((dra_gpus(old) & plugin_gpus(new)) | (plugin_gpus(old) & dra_gpus(new)))


def describe(plan: sharing.Plan) -> str:
    """`nvidia.com/gpu (8), ...`: each resource with its device count."""
    counts = [(r.name, sum(d.resource == r.name for d in plan.devices)) for r in plan.resources]
    dra = plan.dra_devices()
    if dra:
        counts.append((dra[0].resource, len(dra)))
    return ", ".join(f"{name} ({n})" for name, n in counts) or "no resources"


async def run_config_watch(reloader: Reloader) -> NoReturn:
    """Every change of the config file (ConfigMap swaps included) -> reload it."""
    path = reloader.holder.current().config.config_file
    if path is None:
        raise RuntimeError("the config watch needs a config file")
    async for _ in watch.file_changes(path):
        await reloader.reload_config()
    raise RuntimeError("the config watch ended")


async def run_rediscover(reloader: Reloader, hup: asyncio.Event) -> NoReturn:
    """SIGHUP: rediscover the devices and reload the config file."""
    while True:
        await hup.wait()
        hup.clear()
        log.info("SIGHUP: rediscovering devices and reloading the config")
        try:
            new = await reloader.read_config()
        except ConfigError as e:
            log.warning("config reload rejected, keeping the running config: %s", e)
            reloader.on_result("rejected")
            new = reloader.holder.current().config
        try:
            await reloader.apply(new, rediscover=True)
        except ConfigError as e:
            log.warning("rediscovery refused by the config: %s", e)


async def run_simulated_watch(
    be: SimulatedBackend, reloader: Reloader, health_wake: asyncio.Event
) -> NoReturn:
    """Every edit of the simulated-devices file: reload it, re-plan, probe health at once."""
    async for _ in watch.file_changes(be.path):
        if not await be.reload():
            continue
        try:
            await reloader.apply(reloader.holder.current().config, rediscover=True)
        except ConfigError as e:
            log.warning("simulated devices: the new list does not fit the config: %s", e)
        health_wake.set()
    raise RuntimeError("the simulated-devices watch ended")
