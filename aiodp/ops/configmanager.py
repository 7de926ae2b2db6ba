"""`config-manager`: NVIDIA's config-manager, for the GPU Operator's DaemonSet shape.

The Operator runs it from the plugin's own image, once as an init container (ONESHOT=true)
and beside the plugin as a sidecar: it watches the node's label `nvidia.com/device-plugin.config`,
points the symlink CONFIG_FILE_DST at CONFIG_FILE_SRCDIR/<label> (NVIDIA's default and
fallbacks where the label is unset; /dev/null for an empty config), and sends SIGNAL to the
process whose argv[0] is PROCESS_TO_SIGNAL (the plugin, SIGHUP: reload). Same flags and
environment names as NVIDIA's. The chart needs none of this: there the plugin watches the
label itself (`config.pernode`).

Differences from NVIDIA's, on purpose: a bad flag exits 2 naming it; a label naming a config
that is not there, or no plugin process to signal yet, is one line and the sidecar waits for
the next change (NVIDIA's exits and the kubelet restarts it); only the oneshot init container
fails, as it must (the plugin would start on no config).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, NoReturn

from lightkube import AsyncClient, KubeConfig
from lightkube import ConfigError as KubeConfigError
from lightkube.resources.core_v1 import Node

from aiodp.config import resolve
from aiodp.kit import retry
from aiodp.kit.errors import ConfigError, cut_error, cut_text

log = logging.getLogger(__name__)

SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_LABEL: Final = "nvidia.com/device-plugin.config"
MAX_CMDLINE: Final = 4096
"""The most of a process's /proc/<pid>/cmdline read when looking for the one to signal."""
API_TIMEOUT: Final = 10.0
ENV: Final = {
    "oneshot": "ONESHOT", "kubeconfig": "KUBECONFIG", "node_name": "NODE_NAME",
    "node_label": "NODE_LABEL", "config_file_srcdir": "CONFIG_FILE_SRCDIR",
    "config_file_dst": "CONFIG_FILE_DST", "default_config": "DEFAULT_CONFIG",
    "fallback_strategies": "FALLBACK_STRATEGIES", "send_signal": "SEND_SIGNAL",
    "signal": "SIGNAL", "process_to_signal": "PROCESS_TO_SIGNAL",
}  # fmt: skip
FALLBACKS: Final = ("named", "single", "empty")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"config-manager: {message}")


def _bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "t", "yes"):
        return True
    if low in ("0", "false", "f", "no"):
        return False
    raise ConfigError(f"config-manager: {name}: {cut_text(value)!r} is not true or false")


class Settings(argparse.Namespace):
    oneshot: bool
    kubeconfig: str
    node_name: str
    node_label: str
    config_file_srcdir: str
    config_file_dst: str
    default_config: str
    fallback_strategies: tuple[str, ...]
    send_signal: bool
    signal: int
    process_to_signal: str


def parse(argv: Sequence[str], env: Mapping[str, str]) -> Settings:
    """Flags over the environment (an empty variable counts as unset, as NVIDIA's CLI
    library reads it); ConfigError naming the flag or variable that is wrong."""
    p = _Parser(prog="config-manager", description="NVIDIA's config-manager: the node "
                "label's config file, symlinked, and the plugin signalled")  # fmt: skip
    p.add_argument("--oneshot", default=None)
    p.add_argument("--kubeconfig", default=None)
    p.add_argument("--node-name", default=None)
    p.add_argument("--node-label", default=None)
    p.add_argument("--config-file-srcdir", default=None)
    p.add_argument("--config-file-dst", default=None)
    p.add_argument("--default-config", default=None)
    p.add_argument("--fallback-strategies", default=None)
    p.add_argument("--send-signal", default=None)
    p.add_argument("--signal", default=None)
    p.add_argument("--process-to-signal", default=None)
    raw = vars(p.parse_args(list(argv)))
    for key, name in ENV.items():
        if raw[key] is None and env.get(name):
            raw[key] = env[name]
    s = Settings()
    s.oneshot = _bool("ONESHOT", raw["oneshot"] or "false")
    s.kubeconfig = raw["kubeconfig"] or ""
    s.node_name = raw["node_name"] or ""
    s.node_label = raw["node_label"] or DEFAULT_LABEL
    s.config_file_srcdir = raw["config_file_srcdir"] or ""
    s.config_file_dst = raw["config_file_dst"] or ""
    s.default_config = raw["default_config"] or ""
    fallbacks = tuple(f.strip() for f in (raw["fallback_strategies"] or "").split(",") if f.strip())
    for f in fallbacks:
        if f not in FALLBACKS:
            raise ConfigError(f"config-manager: FALLBACK_STRATEGIES: unknown strategy "
                              f"{cut_text(f)!r} (named, single, empty)")  # fmt: skip
    s.fallback_strategies = fallbacks
    s.send_signal = _bool("SEND_SIGNAL", raw["send_signal"] or "false")
    try:
        s.signal = int(raw["signal"] or signal.SIGHUP)
        signal.Signals(s.signal)
    except ValueError:
        raise ConfigError(
            f"config-manager: SIGNAL: {cut_text(str(raw['signal']))!r} is not a signal number"
        ) from None
    s.process_to_signal = raw["process_to_signal"] or "nvidia-device-plugin"
    for key in ("node_name", "node_label", "config_file_srcdir", "config_file_dst"):
        if not getattr(s, key):
            raise ConfigError(f"config-manager: {ENV[key]} (--{key.replace('_', '-')}) "
                              "must not be empty")  # fmt: skip
    return s


def choose(s: Settings, label: str | None) -> str | None:
    """The config file name for `label` (None: the empty config); ConfigError when none."""
    names = resolve.named_configs(Path(s.config_file_srcdir))
    if not names:
        raise ConfigError(f"no configuration files in {s.config_file_srcdir}")
    return resolve.choose_config(label, names, s.default_config, s.fallback_strategies)


def point(s: Settings, name: str | None) -> bool:
    """Point CONFIG_FILE_DST at the chosen file (/dev/null for none); False when it already
    does. The link is made beside the destination and renamed over it (never missing)."""
    src = Path("/dev/null") if name is None else Path(s.config_file_srcdir) / name
    dst = Path(s.config_file_dst)
    if dst.exists() and dst.resolve() == src.resolve():
        return False
    tmp = dst.with_name(f".{dst.name}.new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(src)
    tmp.replace(dst)
    return True


def find_process(name: str, proc: Path = Path("/proc")) -> int | None:
    """The lowest PID whose argv[0] is `name` (as NVIDIA's compares it), or None."""
    found: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with (entry / "cmdline").open("rb") as f:
                argv0 = f.read(MAX_CMDLINE).split(b"\0", 1)[0]
        except OSError:  # gone, or not ours to read
            continue
        if argv0.decode(errors="replace") == name:
            found.append(int(entry.name))
    return min(found) if found else None


def apply(s: Settings, label: str | None) -> None:
    """One label value: choose, point the link, signal the plugin when it changed.
    ConfigError for a config that is not there; OSError for a link that cannot be made."""
    name = choose(s, label)
    if not point(s, name):
        log.info("config %s already in place", name or "(empty)")
        return
    log.info("config is now %s (node label %s=%s)", name or "(empty)", s.node_label,
             cut_text(label or ""))  # fmt: skip
    if not s.send_signal:
        return
    pid = find_process(s.process_to_signal)
    if pid is None:
        log.warning("no process %s to signal: it reads the new config when it starts",
                    cut_text(s.process_to_signal))  # fmt: skip
        return
    os.kill(pid, s.signal)
    log.info("sent %s to %s (pid %d)", signal.Signals(s.signal).name, s.process_to_signal, pid)


def _client(s: Settings) -> AsyncClient:
    try:
        if s.kubeconfig:
            return AsyncClient(KubeConfig.from_file(s.kubeconfig))
        return AsyncClient(KubeConfig.from_service_account(str(SERVICE_ACCOUNT)))
    except (KubeConfigError, OSError, ValueError) as e:
        raise ConfigError(f"config-manager: no Kubernetes API access: {cut_error(e)}") from e


def _label_of(node: Node, key: str) -> str | None:
    return ((node.metadata.labels if node.metadata else None) or {}).get(key)


async def run(s: Settings) -> int:
    api = _client(s)
    if s.oneshot:
        async with asyncio.timeout(API_TIMEOUT):
            node = await api.get(Node, name=s.node_name)
        await asyncio.to_thread(apply, s, _label_of(node, s.node_label))
        return 0
    last: list[str | None] = []  # empty until the first label is seen

    async def watch_once() -> None:
        async for _, node in api.watch(Node, fields={"metadata.name": s.node_name}):
            label = _label_of(node, s.node_label)
            if last and last[0] == label:
                continue
            last[:] = [label]
            try:
                await asyncio.to_thread(apply, s, label)
            except ConfigError as e:
                log.error("config not changed: %s", e)
            except OSError as e:
                log.error("config not changed: %s", cut_error(e))
        raise ConnectionError("the node watch ended")

    await retry.retrying(
        watch_once, delays=(1.0, 2.0, 5.0, 10.0, 30.0), retry_on=(Exception,),
        what=f"watching node {s.node_name}",
    )  # fmt: skip
    return 1


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Exit 2 for a bad flag or variable, 1 when the oneshot cannot put a config in place."""
    try:
        s = parse(argv, env)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    try:
        return asyncio.run(run(s))
    except (ConfigError, OSError, TimeoutError) as e:
        log.error("%s", cut_error(e))
        return 1
    except Exception as e:  # an API error in the oneshot's GET
        log.error("config-manager: %s", cut_error(e))
        return 1
