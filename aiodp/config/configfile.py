"""What NVIDIA's `version: v1` config file says: parsed, validated, frozen.

The only module that knows the file's keys. YAML or JSON. An error names the key path and
the value (`sharing.timeSlicing.resources[0].replicas: must be >= 2, got 1`). An unknown key
is no error, as NVIDIA's plugin ignores it: its path is in `ConfigFile.unknown`, for one
WARNING line each; the GFD-only keys NVIDIA's plugin accepts are in `ConfigFile.ignored`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from aiodp.kit.errors import cut, cut_text


class ConfigFileError(ValueError):
    """The file is not a valid v1 config; the message names the key path and value."""


MAX_FILE_BYTES: Final = 1 << 20
"""Default cap on a config or simulated-devices file (`--max-file-bytes`): real ones are KiB."""


def read_bounded(path: Path, limit: int) -> str:
    """A file's text, refused when it is over `limit` bytes (checked before reading it all).

    Blocking: callers run it off the loop. Raises OSError, or ConfigFileError when too large
    or not UTF-8.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1)
    if size > limit or len(data) > limit:
        raise ConfigFileError(
            f"{max(size, len(data))} bytes, more than the limit of {limit} (--max-file-bytes)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"not UTF-8 text (byte {e.start})") from None


DevicesSelector = Literal["all"] | int | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SharedResource:
    """One `sharing.<method>.resources[]` entry."""

    name: str
    replicas: int
    rename: str = ""
    devices: DevicesSelector = "all"


@dataclass(frozen=True, slots=True)
class Sharing:
    """`sharing.timeSlicing` or `sharing.mps`."""

    method: Literal["time-slicing", "mps"]
    rename_by_default: bool = False
    fail_requests_greater_than_one: bool = False
    resources: tuple[SharedResource, ...] = ()


@dataclass(frozen=True, slots=True)
class NamePattern:
    """A `resources.gpus[]` or `resources.mig[]` rule: glob on product name or MIG profile."""

    pattern: str
    name: str


@dataclass(frozen=True, slots=True)
class ConfigFile:
    flags: Mapping[str, tuple[str, object]] = field(default_factory=dict)
    """Settings by Config field name (`mig_strategy`, ...): (key path in the file, raw value)."""
    sharing: Sharing | None = None
    gpu_names: tuple[NamePattern, ...] = ()
    mig_names: tuple[NamePattern, ...] = ()
    ignored: tuple[str, ...] = ()
    """Key paths accepted and ignored (GFD settings), for one log line."""
    unknown: tuple[str, ...] = ()
    """Key paths outside the schema (cut short, at most MAX_UNKNOWN), for one WARNING each."""


FLAGS: Final[Mapping[str, str]] = {
    "migStrategy": "mig_strategy",
    "failOnInitError": "fail_on_init_error",
    "mpsRoot": "mps_root",
    "nvidiaDriverRoot": "nvidia_driver_root",
    "nvidiaDevRoot": "nvidia_dev_root",
    "gdrcopyEnabled": "gdrcopy_enabled",
    "gdsEnabled": "gds_enabled",
    "mofedEnabled": "mofed_enabled",
    "deviceDiscoveryStrategy": "device_discovery_strategy",
    "useNodeFeatureAPI": "use_node_feature_api",
}
GFD_FLAGS: Final[Mapping[str, str | None]] = {
    "noTimestamp": "no_timestamp",
    "machineTypeFile": "machine_type_file",
    "oneshot": None,
    "sleepInterval": None,
    "outputFile": None,
}
"""`flags.gfd`: what applies to our labels, and what has no meaning here (None: accepted
and ignored; the labels follow every change, there is no interval or output file)."""
PLUGIN_FLAGS: Final[Mapping[str, str]] = {
    "passDeviceSpecs": "pass_device_specs",
    "deviceListStrategy": "device_list_strategy",
    "deviceIDStrategy": "device_id_strategy",
    "cdiAnnotationPrefix": "cdi_annotation_prefix",
    "nvidiaCTKPath": "nvidia_cdi_hook_path",
    "containerDriverRoot": "container_driver_root",
    "sharedDevicesAllocationPolicy": "shared_devices_allocation_policy",
}
IGNORED_FLAGS: Final = frozenset({"gfd"})
MAX_UNKNOWN: Final = 16
"""Unknown key paths kept for the log; more are counted in one more entry."""
_NAME: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def _fail(where: str, msg: str) -> ConfigFileError:
    return ConfigFileError(f"{where}: {msg}")


def _mapping(where: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, f"must be a mapping, got {cut(value)}")
    return value


def _check_keys(
    where: str, value: Mapping[str, Any], allowed: set[str] | frozenset[str], unknown: list[str]
) -> None:
    """Add the key paths of `value` outside `allowed` to `unknown` (NVIDIA ignores them)."""
    prefix = f"{where}." if where else ""
    for key in sorted(str(k) for k in value if k not in allowed):
        unknown.append(prefix + cut_text(key))


def _bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"must be true or false, got {cut(value)}")
    return value


def resource_name(where: str, value: object) -> str:
    """NVIDIA's rule: `x` means `nvidia.com/x`; a DNS-subdomain name, 63 characters at most."""
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"must be a resource name, got {cut(value)}")
    name = value.strip()
    if "/" not in name:
        name = f"nvidia.com/{name}"
    prefix, _, short = name.partition("/")
    if prefix != "nvidia.com" or not _NAME.match(short) or len(name) > 63:
        raise _fail(where, f"must be nvidia.com/<name> with a DNS-subdomain name, got {cut(value)}")
    return name


def _devices(where: str, value: object) -> DevicesSelector:
    if value is None or value == "all":
        return "all"
    if isinstance(value, bool):
        raise _fail(where, f"must be all, a count or a list of GPUs, got {cut(value)}")
    if isinstance(value, int):
        if value < 1:
            raise _fail(where, f"must be >= 1, got {value}")
        return value
    if isinstance(value, list) and value:
        out = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int | str) or item == "":
                raise _fail(
                    f"{where}[{i}]", f"must be an index, <gpu>:<mig> or a UUID, got {cut(item)}"
                )
            out.append(str(item))
        if len(set(out)) != len(out):
            raise _fail(where, f"lists a device twice: {cut(value)}")
        return tuple(out)
    raise _fail(where, f"must be all, a count or a non-empty list of GPUs, got {cut(value)}")


def _sharing(
    where: str, raw: object, method: Literal["time-slicing", "mps"], unknown: list[str]
) -> Sharing | None:
    body = _mapping(where, raw)
    if not body:
        return None
    _check_keys(
        where, body, {"renameByDefault", "failRequestsGreaterThanOne", "resources"}, unknown
    )
    resources_raw = body.get("resources")
    if not isinstance(resources_raw, list) or not resources_raw:
        raise _fail(f"{where}.resources", f"must be a non-empty list, got {cut(resources_raw)}")
    resources = []
    seen: set[str] = set()
    for i, r in enumerate(resources_raw):
        at = f"{where}.resources[{i}]"
        r = _mapping(at, r)
        _check_keys(at, r, {"name", "replicas", "rename", "devices"}, unknown)
        name = resource_name(f"{at}.name", r.get("name"))
        replicas = r.get("replicas")
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise _fail(f"{at}.replicas", f"must be an integer >= 2, got {cut(replicas)}")
        if replicas < 2:
            raise _fail(f"{at}.replicas", f"must be >= 2, got {replicas}")
        rename = resource_name(f"{at}.rename", r["rename"]) if r.get("rename") else ""
        devices = _devices(f"{at}.devices", r.get("devices"))
        key = f"{name}|{devices}"
        if key in seen:
            raise _fail(f"{at}.name", f"{name} is listed twice for the same devices")
        seen.add(key)
        resources.append(SharedResource(name, replicas, rename, devices))
    fail_gt_one = body.get("failRequestsGreaterThanOne", method == "mps")
    return Sharing(
        method=method,
        rename_by_default=_bool(f"{where}.renameByDefault", body.get("renameByDefault", False)),
        fail_requests_greater_than_one=_bool(f"{where}.failRequestsGreaterThanOne", fail_gt_one),
        resources=tuple(resources),
    )


def _patterns(where: str, raw: object, unknown: list[str]) -> tuple[NamePattern, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail(where, f"must be a list, got {cut(raw)}")
    out = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        item = _mapping(at, item)
        _check_keys(at, item, {"pattern", "name"}, unknown)
        pattern = item.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise _fail(f"{at}.pattern", f"must be a glob pattern, got {cut(pattern)}")
        out.append(NamePattern(pattern, resource_name(f"{at}.name", item.get("name"))))
    return tuple(out)


class _NoAliases(yaml.SafeLoader):
    """PyYAML's safe loader refusing aliases: nested aliases expand exponentially (a
    352-byte file became a 351 MB value). Neither of our files needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted", event.start_mark
            )
        return super().compose_node(parent, index)


YAMLError: Final = yaml.YAMLError
"""What `load_yaml` raises on text that is not YAML (for callers that may not import yaml)."""


def load_yaml(text: str) -> Any:
    """YAML (or JSON) text as plain values, aliases refused; raises yaml.YAMLError.

    Blocking and proportional to the text: callers bound the text and call it off the loop.
    """
    return yaml.load(text, Loader=_NoAliases)


def parse(text: str) -> ConfigFile:
    """The file's text (YAML or JSON) as a ConfigFile; raises ConfigFileError."""
    try:
        doc = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigFileError(
            "invalid YAML or JSON: " + cut_text(str(e).replace("\n", " "), 300)
        ) from None
    doc = _mapping("(top level)", doc)
    unknown: list[str] = []
    _check_keys("", doc, {"version", "flags", "resources", "sharing", "imex", "dra"}, unknown)
    version = doc.get("version", "v1")
    if version not in ("v1", "", None):
        raise _fail("version", f"must be v1, got {cut(version)}")
    ignored: list[str] = []
    flags: dict[str, tuple[str, object]] = {}
    raw_flags = _mapping("flags", doc.get("flags"))
    known_flags = set(FLAGS) | {"plugin"} | IGNORED_FLAGS
    _check_keys("flags", raw_flags, known_flags, unknown)
    plugin = _mapping("flags.plugin", raw_flags.get("plugin"))
    _check_keys("flags.plugin", plugin, set(PLUGIN_FLAGS), unknown)
    named = [
        (f"flags.{k}", FLAGS.get(k), v)
        for k, v in raw_flags.items()
        if k not in ("plugin", "gfd") and k in known_flags
    ]
    named += [
        (f"flags.plugin.{k}", PLUGIN_FLAGS[k], v) for k, v in plugin.items() if k in PLUGIN_FLAGS
    ]
    gfd = _mapping("flags.gfd", raw_flags.get("gfd"))
    _check_keys("flags.gfd", gfd, set(GFD_FLAGS), unknown)
    named += [(f"flags.gfd.{k}", GFD_FLAGS[k], v) for k, v in gfd.items() if k in GFD_FLAGS]
    for path, name, value in named:
        if value is None:
            continue
        if name is None:
            ignored.append(path)
        else:
            flags[name] = (path, value)
    resources = _mapping("resources", doc.get("resources"))
    _check_keys("resources", resources, {"gpus", "mig"}, unknown)
    sharing_raw = _mapping("sharing", doc.get("sharing"))
    _check_keys("sharing", sharing_raw, {"timeSlicing", "mps"}, unknown)
    ts = _sharing("sharing.timeSlicing", sharing_raw.get("timeSlicing"), "time-slicing", unknown)
    mps = _sharing("sharing.mps", sharing_raw.get("mps"), "mps", unknown)
    if ts is not None and mps is not None:
        raise _fail("sharing", "timeSlicing and mps are mutually exclusive")
    imex = _mapping("imex", doc.get("imex"))
    _check_keys("imex", imex, {"channelIDs", "required"}, unknown)
    channels = imex.get("channelIDs") or []
    if channels not in ([], [0]):
        raise _fail("imex.channelIDs", f"must be [] or [0], got {cut(channels)}")
    if channels:
        flags["imex_channel_ids"] = ("imex.channelIDs", channels)
    if imex.get("required") is not None:
        flags["imex_required"] = ("imex.required", imex["required"])
    dra = _mapping("dra", doc.get("dra"))  # aiodp's own key: which GPUs DRA serves
    _check_keys("dra", dra, {"devices"}, unknown)
    if dra.get("devices") is not None:
        flags["dra_devices"] = ("dra.devices", dra["devices"])
    return ConfigFile(
        flags=flags,
        sharing=ts or mps,
        gpu_names=_patterns("resources.gpus", resources.get("gpus"), unknown),
        mig_names=_patterns("resources.mig", resources.get("mig"), unknown),
        ignored=tuple(ignored),
        unknown=_bounded(unknown),
    )


def _bounded(unknown: list[str]) -> tuple[str, ...]:
    if len(unknown) <= MAX_UNKNOWN:
        return tuple(unknown)
    return (*unknown[: MAX_UNKNOWN - 1], f"and {len(unknown) - MAX_UNKNOWN + 1} more")
