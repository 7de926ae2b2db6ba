"""The MPS control daemons: one `nvidia-cuda-mps-control -d` per MPS resource, run and kept
running by the plugin, as NVIDIA's mps-control-daemon DaemonSet does beside its plugin.

For each resource shared with `sharing.mps`: its GPUs are set to EXCLUSIVE_PROCESS, the pipe
and log directories `<mpsRoot>/<resource>/{pipe,log}` are made, `<mpsRoot>/shm` is mounted as
a tmpfs (the containers' /dev/shm), the daemon is started with `CUDA_MPS_PIPE_DIRECTORY` and
`CUDA_MPS_LOG_DIRECTORY`, and its defaults are set: `set_default_device_pinned_mem_limit
<gpu index> <memory / replicas>M` for each GPU and `set_default_active_thread_percentage
<100 / replicas>`. Every health interval the daemon is asked
`get_default_active_thread_percentage`; while it does not answer, its GPUs are held Unhealthy
with the reason, and it is started again. NVIDIA checks the daemon once, at start.

A daemon outlives the plugin: a restarted plugin finds it answering and adopts it (its
clients keep running); only a resource a reload removes has its daemon told to `quit` and
its GPUs put back to DEFAULT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from aiodp.config.model import Config
from aiodp.gpus.backend import DeviceBackend
from aiodp.gpus.live import Holder, Live
from aiodp.kit import commands
from aiodp.kit.errors import BackendError, ConfigError, cut_text

log = logging.getLogger(__name__)

PROBE: Final = "get_default_active_thread_percentage"
COMMAND_TIMEOUT: Final = 10.0
"""Seconds one call of the control binary may take (it answers in milliseconds)."""
MAX_ANSWER: Final = 4096
"""Bytes of a control answer read; more is not a real answer."""


class MpsError(Exception):
    """The control daemon did not start or answer; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class DaemonSpec:
    """One MPS resource's daemon: where its pipes go and the defaults it sets."""

    resource: str
    root: Path
    gpus: tuple[tuple[int, str, int], ...]
    """(index, UUID, memory MiB) of each GPU the resource shares."""
    replicas: int
    threads: int | None = None
    """A claim's own defaultActiveThreadPercentage (None: 100 / replicas)."""
    pinned_mib: int | None = None
    """A claim's own defaultPinnedDeviceMemoryLimit in MiB (None: memory / replicas)."""

    @property
    def uuids(self) -> list[str]:
        return [uuid for _, uuid, _ in self.gpus]

    @property
    def pipe_dir(self) -> Path:
        return self.root / self.resource / "pipe"

    @property
    def log_dir(self) -> Path:
        return self.root / self.resource / "log"

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }

    def defaults(self) -> list[str]:
        """The commands that set this resource's per-client limits (NVIDIA's defaults)."""
        out = [
            f"set_default_device_pinned_mem_limit {index} "
            f"{self.pinned_mib if self.pinned_mib is not None else memory // self.replicas}M"
            for index, _, memory in self.gpus
            if memory or self.pinned_mib is not None
        ]
        threads = self.threads if self.threads is not None else 100 // self.replicas
        out.append(f"set_default_active_thread_percentage {threads}")
        return out


def specs(live: Live) -> list[DaemonSpec]:
    """A daemon for each resource the live plan shares with MPS."""
    config = live.config
    if config.mps_root is None:
        return []
    memory = {g.uuid: g.memory_mib for g in live.gpus}
    out = []
    for resource in live.plan.resources:
        if resource.sharing != "mps":
            continue
        gpus = {
            d.gpu: (int(d.index), d.gpu, memory.get(d.gpu, 0))
            for d in live.plan.devices
            if d.resource == resource.name
        }
        out.append(
            DaemonSpec(resource.name, config.mps_root, tuple(sorted(gpus.values())),
                       max(resource.replicas, 1))
        )  # fmt: skip
    return out


def check(config: Config, backend: DeviceBackend) -> None:
    """Refuse an MPS config this node cannot serve, in one line naming what is missing."""
    if config.sharing is None or config.sharing.method != "mps":
        return
    if getattr(backend, "name", "") != "nvml":
        raise ConfigError(
            "sharing.mps: needs NVML (the simulated backend has no GPUs for an MPS daemon)"
        )
    if shutil.which(config.mps_control) is None:
        raise ConfigError(
            f"sharing.mps: the MPS control binary {cut_text(config.mps_control)} is not on "
            "PATH (--mps-control, AIODP_MPS_CONTROL; it comes with the NVIDIA driver)"
        )


class Control:
    """Talks to one daemon through the control binary (never on the loop: a subprocess)."""

    def __init__(self, binary: str, spec: DaemonSpec) -> None:
        self.binary, self.spec = binary, spec

    async def _run(self, args: Sequence[str], text: str | None) -> str:
        try:
            code, answer = await commands.run(
                [self.binary, *args], within=COMMAND_TIMEOUT, stdin=text, env=self.spec.env,
                limit=MAX_ANSWER,
            )  # fmt: skip
        except OSError as e:
            raise MpsError(f"cannot run {cut_text(self.binary)}: {e.strerror or e}") from None
        except TimeoutError:
            raise MpsError(f"no answer within {COMMAND_TIMEOUT:.0f} s") from None
        if code != 0:
            raise MpsError(f"exit code {code}: {cut_text(answer, 120) or 'no output'}")
        return answer

    async def send(self, command: str) -> str:
        return await self._run((), command + "\n")

    async def start(self) -> None:
        """`-d` starts the daemon in the background (the binary returns at once)."""
        await self._run(("-d",), None)

    async def quit(self) -> None:
        await self.send("quit")


MountShm = Callable[[Path], Awaitable[None]]


async def mount_shm(path: Path) -> None:
    """A tmpfs at `<mpsRoot>/shm` (what containers get as /dev/shm), unless one is there;
    needs CAP_SYS_ADMIN. Failing, one line: clients then share a plain directory."""
    if await asyncio.to_thread(os.path.ismount, path):
        return
    argv = ["mount", "-t", "tmpfs", "-o", "rw,nosuid,nodev,noexec,size=50%", "tmpfs", str(path)]
    try:
        code, why = await commands.run(argv, within=COMMAND_TIMEOUT)
    except (OSError, TimeoutError) as e:
        code, why = -1, f"{type(e).__name__}: {e}"
    if code != 0:
        log.warning("MPS: cannot mount a tmpfs at %s (%s); it stays a plain directory",
                    path, cut_text(why, 160))  # fmt: skip


class Supervisor:
    """Keeps one daemon per MPS resource answering; holds its GPUs Unhealthy while not."""

    def __init__(
        self,
        holder: Holder,
        backend: DeviceBackend,
        hold: Callable[[Collection[str], str | None], object],
        *,
        mount: MountShm = mount_shm,
    ) -> None:
        self.holder, self.backend, self.hold, self.mount = holder, backend, hold, mount
        self.running: dict[str, DaemonSpec] = {}
        self.claims: dict[str, DaemonSpec] = {}
        """Daemons of prepared DRA claims (by claim UID), one each as NVIDIA's driver runs."""
        self.down: dict[str, str] = {}
        """Resources whose daemon does not answer, with why."""

    def _control(self, spec: DaemonSpec) -> Control:
        return Control(self.holder.current().config.mps_control, spec)

    async def _bring_up(self, spec: DaemonSpec) -> None:
        """Compute mode, directories, shm, the daemon (adopted if it answers), its limits."""
        control = self._control(spec)
        try:
            await self.backend.set_compute_mode(spec.uuids, exclusive=True)
        except BackendError as e:
            raise MpsError(str(e)) from None
        for d in (spec.pipe_dir, spec.log_dir, spec.root / "shm"):
            await asyncio.to_thread(d.mkdir, parents=True, exist_ok=True)
        if self.holder.current().config.mps_mount_shm:
            await self.mount(spec.root / "shm")
        try:
            await control.send(PROBE)
            log.info("MPS: the control daemon for %s answers already: adopted", spec.resource)
        except MpsError:
            await control.start()
        for command in spec.defaults():
            await control.send(command)
        await control.send(PROBE)

    async def _check(self, spec: DaemonSpec) -> None:
        """Ask the daemon; if it does not answer, hold its GPUs and start it again."""
        gpus = spec.uuids
        try:
            if spec.resource in self.down or self.running.get(spec.resource) != spec:
                await self._bring_up(spec)
            else:
                await self._control(spec).send(PROBE)
        except MpsError as e:
            why = f"MPS control daemon for {spec.resource} is down: {e}"
            if self.down.get(spec.resource) != why:
                log.error("%s", why)
            self.down[spec.resource] = why
            self.running[spec.resource] = spec
            self.hold(gpus, why)
            with contextlib.suppress(MpsError):  # at once, not only at the next interval
                await self._bring_up(spec)
                self.down.pop(spec.resource)
                log.info("MPS: the control daemon for %s answers again", spec.resource)
                self.hold(gpus, None)
            return
        if self.down.pop(spec.resource, None) is not None:
            log.info("MPS: the control daemon for %s answers again", spec.resource)
        elif self.running.get(spec.resource) != spec:
            log.info("MPS: control daemon for %s serving %d GPU(s), %d clients each at most "
                     "%d%% of the threads", spec.resource, len(spec.gpus), spec.replicas,
                     100 // spec.replicas)  # fmt: skip
        self.running[spec.resource] = spec
        self.hold(gpus, None)

    async def _retire(self, spec: DaemonSpec) -> None:
        """A resource a reload removed: its daemon quits, its GPUs go back to DEFAULT."""
        with contextlib.suppress(MpsError):
            await self._control(spec).quit()
        with contextlib.suppress(BackendError):
            await self.backend.set_compute_mode(spec.uuids, exclusive=False)
        self.hold(spec.uuids, None)
        self.down.pop(spec.resource, None)
        log.info("MPS: control daemon for %s stopped (resource removed)", spec.resource)

    async def start_claim(self, uid: str, spec: DaemonSpec) -> None:
        """A prepared claim's daemon: brought up now (MpsError: the claim's error), then kept
        answering by `step` until `stop_claim`."""
        await self._bring_up(spec)
        self.claims[uid] = spec
        self.running[spec.resource] = spec
        log.info("MPS: control daemon for claim %s serving %d GPU(s)", uid, len(spec.gpus))

    def adopt_claim(self, uid: str, spec: DaemonSpec) -> None:
        """A claim prepared before a restart: its daemon is checked (and started) by `step`."""
        self.claims[uid] = spec

    async def stop_claim(self, uid: str) -> None:
        spec = self.claims.pop(uid, None)
        if spec is not None:
            self.running.pop(spec.resource, None)
            await self._retire(spec)

    async def step(self) -> None:
        """Bring the daemons in line with the live plan and check each once."""
        wanted = {s.resource: s for s in specs(self.holder.current())}
        wanted |= {s.resource: s for s in self.claims.values()}
        for name, spec in list(self.running.items()):
            if name not in wanted or wanted[name].gpus != spec.gpus:
                await self._retire(spec)
                del self.running[name]
        for spec in wanted.values():
            await self._check(spec)

    async def start(self) -> None:
        """The first step, before the plugins register: a resource is advertised Healthy
        only once its daemon answers."""
        held = [u for s in specs(self.holder.current()) for u in s.uuids]
        if held:
            self.hold(held, "MPS control daemon starting")
        await self.step()


async def run(supervisor: Supervisor, *, interval: float) -> NoReturn:
    """Check every `interval` seconds, and at once after every change of the live plan."""
    live = supervisor.holder.current()
    while True:
        with contextlib.suppress(TimeoutError):  # with no daemon a step is a no-op
            async with asyncio.timeout(interval):
                live = await supervisor.holder.next_after(live.version)
        await supervisor.step()
