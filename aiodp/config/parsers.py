"""What each setting's value may be: one parser per key, for a flag's or variable's string
and for a config file's typed value alike."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, cast

from aiodp.config.model import LIST_STRATEGIES, DraSelector, ListStrategy
from aiodp.kit.errors import cut

# Each parser takes a flag's or variable's string, or a config file's typed YAML value
# (a bool, a number, a list), and returns the typed setting; ValueError says what is wrong.


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _choice(choices: Sequence[str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        v = value.strip().lower() if isinstance(value, str) else None
        if v is None or v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return v

    return parse


TRUE_WORDS: Final = ("1", "t", "true", "yes", "on")
"""Go's strconv.ParseBool words (what NVIDIA's flags take), and yes/on."""
FALSE_WORDS: Final = ("0", "f", "false", "no", "off")


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    v = _text(value).strip().lower()
    if v in TRUE_WORDS:
        return True
    if v in FALSE_WORDS:
        return False
    raise ValueError(
        f"must be a boolean: {', '.join(TRUE_WORDS)} or {', '.join(FALSE_WORDS)} (any case)"
    )


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, int | float):
        return float(value)
    return float(_text(value))


def _seconds(value: object) -> float:
    v = _number(value)
    if not v > 0 or v != v or v == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return v


def _period(value: object) -> float:
    v = _number(value)
    if not v >= 0 or v == float("inf"):
        raise ValueError("must be a number of seconds >= 0 (0: never recover)")
    return v


def _list_strategy(value: object) -> tuple[ListStrategy, ...]:
    raw = [_text(v) for v in value] if isinstance(value, list | tuple) else _text(value).split(",")
    items = [s.strip().lower() for s in raw if s.strip()]
    if not items:
        raise ValueError("must name at least one strategy")
    for s in items:
        if s not in LIST_STRATEGIES:
            raise ValueError(
                f"unknown strategy {cut(s)}; must be among {', '.join(LIST_STRATEGIES)}"
            )
    return tuple(dict.fromkeys(cast(list[ListStrategy], items)))


def _file_bytes(value: object) -> int:
    if isinstance(value, bool | float):
        raise ValueError("must be a whole number of bytes")
    try:
        v = value if isinstance(value, int) else int(_text(value).strip())
    except ValueError:
        raise ValueError("must be a whole number of bytes") from None
    if not 1024 <= v <= 64 << 20:
        raise ValueError("must be between 1024 and 67108864 bytes")
    return v


def _words(value: object) -> tuple[str, ...]:
    """A comma list (flag, repeated flag, variable) or a YAML list of words."""
    raw = [_text(v) for v in value] if isinstance(value, list | tuple) else _text(value).split(",")
    return tuple(dict.fromkeys(w.strip() for w in raw if w.strip()))


def _fallbacks(value: object) -> tuple[str, ...]:
    items = _words(value)
    for item in items:
        if item not in ("named", "single", "empty"):
            raise ValueError(f"unknown strategy {cut(item)}; must be among named, single, empty")
    return items


def _paths(value: object) -> tuple[Path, ...]:
    return tuple(Path(w) for w in _words(value))


def _imex_channels(value: object) -> tuple[int, ...]:
    """NVIDIA accepts no channel or channel 0."""
    if isinstance(value, list | tuple):
        items = list(value)
    else:
        items = [v for v in _text(value).split(",") if v.strip()]
    try:
        ids = tuple(dict.fromkeys(int(str(v).strip()) for v in items))
    except ValueError:
        raise ValueError("must be a list of channel numbers") from None
    if ids not in ((), (0,)):
        raise ValueError("must be empty or 0 (one IMEX channel per node)")
    return ids


def _address(value: object) -> str:
    v = _text(value).strip()
    if not v:
        return ""
    _, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT or :PORT with a port in 1..65535")
    return v


def _nonempty(value: object) -> str:
    v = _text(value)
    if not v.strip():
        raise ValueError("must not be empty")
    return v.strip()


def _path(value: object) -> Path:
    return Path(_nonempty(value))


def _optional_path(value: object) -> Path | None:
    """A path, or None (off) when empty."""
    if isinstance(value, str) and not value.strip():
        return None
    return Path(_nonempty(value))


def _host_root(value: object) -> Path:
    """A host directory that goes into DeviceSpec and Mount host paths: absolute and
    normalised, so that `relative/root` or `/host/../etc` cannot point anywhere else."""
    v = _nonempty(value)
    if not v.startswith("/"):
        raise ValueError("must be an absolute path")
    if v != "/" and (os.path.normpath(v) != v.rstrip("/") or "//" in v):
        raise ValueError("must be a normalised path (no '.', '..' or '//')")
    return Path(v)


def _cdi_kind(value: object) -> str:
    v = _nonempty(value)
    vendor, sep, cls = v.partition("/")
    if not sep or not vendor or not cls or "=" in v:
        raise ValueError("must be a CDI kind vendor/class, e.g. nvidia.com/gpu")
    return v


_DNS_SUBDOMAIN: Final = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


def _driver_name(value: object) -> str:
    v = _nonempty(value)
    if len(v) > 63 or not _DNS_SUBDOMAIN.match(v) or "." not in v:
        raise ValueError("must be a DNS subdomain of at most 63 characters, e.g. gpu.aiodp.io")
    return v


MAX_DRA_SELECTORS: Final = 1024


def _dra_devices(value: object) -> DraSelector:
    """none, all, or GPU indexes / UUIDs (a comma list, or a YAML list in the file)."""
    items: list[object]
    if isinstance(value, str):
        if value.strip() in ("none", "all"):
            return cast(DraSelector, value.strip())
        items = [w for w in value.split(",") if w.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError("must be none, all, or a list of GPU indexes or UUIDs")
    if not items or len(items) > MAX_DRA_SELECTORS:
        raise ValueError(f"must list 1 to {MAX_DRA_SELECTORS} GPUs (or say none or all)")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise ValueError(f"{cut(item)} is not a GPU index or UUID")
        text = str(item).strip()
        if not text or len(text) > 128:
            raise ValueError(f"{cut(item)} is not a GPU index or UUID")
        out.append(text)
    return tuple(dict.fromkeys(out))


PARSERS: Final[Mapping[str, Callable[[object], object]]] = {
    "config_file": _path,
    "mig_strategy": _choice(("none", "single", "mixed")),
    "shared_devices_allocation_policy": _choice(("distributed", "packed")),
    "mps_root": _host_root,
    "mps_control": _nonempty,
    "mps_mount_shm": parse_bool,
    "nvidia_smi": _nonempty,
    "kubelet_socket": _path,
    "backend": _choice(("auto", "nvml", "simulated")),
    "simulated_devices": _path,
    "device_id_strategy": _choice(("uuid", "index")),
    "device_list_strategy": _list_strategy,
    "pass_device_specs": parse_bool,
    "cdi_annotation_prefix": _nonempty,
    "cdi_kind": _cdi_kind,
    "nvidia_driver_root": _host_root,
    "nvidia_dev_root": _host_root,
    "fail_on_init_error": parse_bool,
    "log_level": _choice(("debug", "info", "warning", "error")),
    "log_format": _choice(("text", "json")),
    "metrics_address": _address,
    "health_interval": _seconds,
    "health_recovery_period": _period,
    "device_metrics_interval": _period,
    "pod_resources_socket": _optional_path,
    "node_signals": parse_bool,
    "gfd": parse_bool,
    "use_node_feature_api": parse_bool,
    "no_timestamp": parse_bool,
    "machine_type_file": _path,
    "namespace": _nonempty,
    "shutdown_timeout": _seconds,
    "max_file_bytes": _file_bytes,
    "gdrcopy_enabled": parse_bool,
    "gds_enabled": parse_bool,
    "mofed_enabled": parse_bool,
    "imex_channel_ids": _imex_channels,
    "imex_required": parse_bool,
    "device_discovery_strategy": _choice(("auto", "nvml", "tegra")),
    "container_driver_root": _host_root,
    "nvidia_cdi_hook_path": _path,
    "cdi_feature_flags": _words,
    "cdi_disable_hooks": _words,
    "cdi_spec_dirs": _paths,
    "config_dir": _path,
    "node_name": _nonempty,
    "pod_uid": _nonempty,
    "node_label": _nonempty,
    "default_config": _text,
    "fallback_strategies": _fallbacks,
    "kubeconfig": _path,
    "dra": parse_bool,
    "dra_devices": _dra_devices,
    "dra_driver_name": _driver_name,
    "dra_registry_dir": _path,
    "dra_plugins_dir": _path,
    "dra_cdi_dir": _path,
}
