"""How the settings are decided: flags, environment and config file in one frozen Config.

Only this package interprets the environment; `__main__` hands `os.environ` to `resolve`.
Precedence: flag > environment variable > config file > default. The config file is read by
one function, `load`, at start, on every reload and in the tests.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, cast

from aiodp.config import configfile, flags, parsers
from aiodp.config.model import RESOURCE_GPU, Command, Config, health_policy
from aiodp.kit.errors import ConfigError, brief, cut, cut_text

log = logging.getLogger(__name__)


def named_configs(config_dir: Path) -> list[str]:
    """The named configs in a mounted ConfigMap directory (its keys; `..data` and the dated
    directories are the volume's own). Blocking: a listdir."""
    try:
        names = sorted(p.name for p in config_dir.iterdir())
    except OSError:
        return []
    return [n for n in names if not n.startswith(".")]


def labelled_config_path(running: Config, label: str | None) -> Path | None:
    """The file in `running.config_dir` that the node's label names, by NVIDIA's default and
    fallbacks (ConfigError when none fits); reads the directory."""
    assert running.config_dir is not None
    chosen = choose_config(
        label, named_configs(running.config_dir), running.default_config,
        running.fallback_strategies,
    )  # fmt: skip
    return None if chosen is None else running.config_dir / chosen


def with_labelled_config(running: Config, path: Path | None) -> Config:
    """The running flags and environment over the config file a node label chose (read,
    bounded); used at start and on every relabel."""
    file = None if path is None else load(path, limit=running.max_file_bytes)
    sources = {**running.sources, "config_file": f"node label {running.node_label}"}
    return build(
        {**running.overrides, "config_file": path}, file, command=running.command, sources=sources
    )


def choose_config(
    label: str | None, names: Sequence[str], default: str, fallbacks: Sequence[str]
) -> str | None:
    """NVIDIA's choice of config (pure): the label's, else `default`, else the fallbacks in
    order (`named`: a config called "default"; `single`: the only one; `empty`: none, which
    returns None). Raises ConfigError naming what is missing."""
    if label:
        if label in names:
            return label
        raise ConfigError(f"node label names config {cut_text(label)!r}, not among {brief(names)}")
    if default:
        if default in names:
            return default
        raise ConfigError(f"the default config {default!r} is not among {brief(names)}")
    for strategy in fallbacks:
        if strategy == "named" and "default" in names:
            return "default"
        if strategy == "single" and len(names) == 1:
            return names[0]
        if strategy == "empty":
            return None
    raise ConfigError(
        f"no config for this node: no label, no default config, and the fallbacks "
        f"({', '.join(fallbacks)}) find none among {brief(names)}"
    )


def resolve(
    argv: Sequence[str],
    environ: Mapping[str, str],
    read: Callable[[Path], str] | None = None,
) -> Config:
    """Flags over environment over the config file over defaults.

    `read` reads the config file (tests pass a dict lookup); a ConfigError names the flag,
    variable or key path and the value.
    """
    found, _ = flags.parser(add_help=False).parse_known_args(list(argv))
    ns = flags.parser(found.command or "serve").parse_args(list(argv))
    overrides: dict[str, object] = {}
    sources: dict[str, str] = {}
    notes: list[str] = []
    for key, envs in flags.ENV.items():
        raw = getattr(ns, key, None)  # None: not a flag of this command
        if isinstance(raw, list):  # a repeated flag: its values add up, as NVIDIA's do
            raw = ",".join(raw)
        source = flags.flag_name(key)
        for env in (envs,) if isinstance(envs, str) else envs:
            if raw is None and env in environ:
                raw, source = environ[env], env
        if raw is None:
            continue
        try:
            overrides[key] = parsers.PARSERS[key](raw)
        except ValueError as e:
            raise ConfigError(f"{source}: invalid value {cut(raw)}: {e}") from None
        sources[key] = source if source.startswith("--") else f"env {source}"
    overrides["health_policy"] = health_policy(
        environ.get("DP_DISABLE_HEALTHCHECKS"), environ.get("DP_ENABLE_HEALTHCHECKS"), notes
    )
    overrides["notes"] = tuple(notes)
    command: Command = ns.command or "serve"
    path = overrides.get("config_file")
    config_dir = overrides.get("config_dir")
    if isinstance(config_dir, Path):  # the label is not known yet: the default for now
        if "config_file" in overrides:
            raise ConfigError("--config-file and --config-dir: give one of them")
        default = Config()
        chosen = choose_config(
            None,
            named_configs(config_dir),
            str(overrides.get("default_config", default.default_config)),
            cast(
                tuple[str, ...], overrides.get("fallback_strategies", default.fallback_strategies)
            ),
        )
        overrides["config_file"] = None if chosen is None else config_dir / chosen
        sources["config_file"] = f"{config_dir} (default for a node without the label)"
    limit = overrides.get("max_file_bytes", configfile.MAX_FILE_BYTES)
    assert isinstance(limit, int)
    file = load(path, read, limit=limit) if isinstance(path, Path) else None
    config = build(overrides, file, command=command, sources=sources)
    output: Literal["table", "json", "yaml"] = getattr(ns, "output", "table")
    return dataclasses.replace(config, output=output) if output != "table" else config


def effective(config: Config) -> str:
    """Every setting with its value and origin, in one line (NVIDIA's "Running with
    config"): `mig_strategy=none (default), pass_device_specs=True (env PASS_DEVICE_SPECS)`."""
    parts = []
    for key in parsers.PARSERS:
        value = getattr(config, key)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        parts.append(f"{key}={cut_text(str(value))} ({config.sources.get(key, 'default')})")
    return ", ".join(parts)


def warn_unknown(config: Config) -> None:
    """One WARNING per config-file key outside the schema (the rest of the file applies)."""
    for key in config.unknown:
        log.warning(
            "config file %s: unknown key %s, ignored (as NVIDIA's plugin ignores it)",
            config.config_file, key,
        )  # fmt: skip


def changed(config: Config, limit: int = 240) -> str:
    """The settings not at their default, with their origins, in at most `limit` characters
    (the start-up line; `effective` has every one): `mig_strategy=mixed (--mig-strategy), ...`
    or `all settings at their defaults`."""
    parts = []
    for key in parsers.PARSERS:
        source = config.sources.get(key, "default")
        if source == "default":
            continue
        value = getattr(config, key)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        parts.append(f"{key}={cut_text(str(value), 60)} ({cut_text(source, 60)})")
    if not parts:
        return "all settings at their defaults"
    out = ""
    for n, part in enumerate(parts):
        more = f", and {len(parts) - n} more" if n else f"{len(parts)} settings"
        if len(out) + len(part) + 2 + len(more) > limit:
            return out + more
        out = f"{out}, {part}" if out else part
    return out


def load(
    path: Path,
    read: Callable[[Path], str] | None = None,
    *,
    limit: int = configfile.MAX_FILE_BYTES,
) -> configfile.ConfigFile:
    """Read (at most `limit` bytes) and parse the config file: at start, on every reload, in
    the tests.

    Blocking (a file read and a parse): the running plugin calls it in a thread. A
    ConfigError names the file and the key path and value.
    """
    try:
        text = read(path) if read is not None else configfile.read_bounded(path, limit)
        return configfile.parse(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    except configfile.ConfigFileError as e:
        raise ConfigError(f"{path}: {e}") from None


def build(
    overrides: Mapping[str, object],
    file: configfile.ConfigFile | None,
    *,
    command: Command = "serve",
    sources: Mapping[str, str] | None = None,
) -> Config:
    """One Config from flag/env values and a parsed config file (file values lose).

    `sources` says where each override came from (the flag or variable), for the start-up
    line that lists every setting with its origin."""
    values: dict[str, object] = {}
    origin = {key: "default" for key in parsers.PARSERS}
    if file is not None:
        origin.update({key: f"config file {where}" for key, (where, _) in file.flags.items()})
        for key, (where, raw) in file.flags.items():
            try:
                values[key] = parsers.PARSERS[key](raw)
            except ValueError as e:
                raise ConfigError(f"{where}: invalid value {cut(raw)}: {e}") from None
        values.update(
            sharing=file.sharing,
            gpu_names=file.gpu_names,
            mig_names=file.mig_names,
            ignored=file.ignored,
            unknown=file.unknown,
        )
    values.update(overrides)
    origin.update({k: (sources or {}).get(k, "flag or env") for k in overrides if k in origin})
    values["sources"] = origin
    values["command"] = command
    values["overrides"] = {k: v for k, v in overrides.items() if k != "notes"}
    config = validate(Config(**values))  # type: ignore[arg-type]
    inert = inert_settings(config)
    return dataclasses.replace(config, notes=config.notes + inert) if inert else config


def inert_settings(config: Config) -> tuple[str, ...]:
    """NVIDIA settings that are set but mean nothing here, each with what aiodp does."""
    out = []
    default = Config()
    no_spec = "aiodp generates no CDI spec (the node's own spec is used), so it has no effect"
    if config.nvidia_cdi_hook_path != default.nvidia_cdi_hook_path:
        out.append(f"--nvidia-cdi-hook-path {config.nvidia_cdi_hook_path}: {no_spec}")
    if config.cdi_feature_flags:
        out.append(f"--cdi-feature-flags {','.join(config.cdi_feature_flags)}: {no_spec}")
    if config.cdi_disable_hooks:
        out.append(f"--cdi-disable-hooks {','.join(config.cdi_disable_hooks)}: {no_spec}")
    if config.container_driver_root != default.container_driver_root:
        out.append(
            f"--driver-root-ctr-path {config.container_driver_root}: accepted; aiodp looks "
            f"for device nodes under --nvidia-dev-root ({config.dev_root})"
        )
    return tuple(out)


def validate(config: Config) -> Config:
    """Cross-field checks; returns the config unchanged or raises ConfigError."""
    if config.device_discovery_strategy == "tegra":
        raise ConfigError(
            "--device-discovery-strategy: invalid value 'tegra': aiodp finds GPUs with NVML "
            "and does not support Tegra (integrated) GPUs; run NVIDIA's plugin on Tegra nodes"
        )
    if config.backend == "simulated" and config.simulated_devices is None:
        raise ConfigError(
            "--backend: invalid value 'simulated': needs --simulated-devices "
            "(AIODP_SIMULATED_DEVICES)"
        )
    if len(str(config.socket_path(RESOURCE_GPU))) > config.MAX_SOCKET_PATH:
        raise ConfigError(
            f"--kubelet-socket: invalid value {cut(str(config.kubelet_socket))}: "
            "the directory is too long for a unix socket path (107 bytes)"
        )
    for sock, what in ((config.dra_socket, "--dra-plugins-dir"),
                       (config.dra_registration_socket, "--dra-registry-dir")):  # fmt: skip
        if config.dra and len(str(sock)) > config.MAX_SOCKET_PATH:
            raise ConfigError(
                f"{what}: invalid value {cut(str(sock.parent))}: {sock} is longer than "
                f"{config.MAX_SOCKET_PATH} bytes, the limit of a unix socket path"
            )
    if config.sharing is not None and config.sharing.method == "mps":
        if config.mps_root is None:
            raise ConfigError("sharing.mps: needs flags.mpsRoot (--mps-root, MPS_ROOT)")
        if config.mig_strategy == "mixed":
            raise ConfigError("sharing.mps: cannot be combined with migStrategy mixed")
    return config
