"""Whether the node can resolve the CDI device names we hand out: the specs in its CDI
directories, read bounded, compared with the names Allocate gives.

aiodp writes no CDI spec of its own: the node's spec (`nvidia-ctk cdi generate`, or the GPU
Operator) is the source of truth for device nodes, libraries and hooks. A name we would hand
out that no spec defines makes container creation fail, so it is reported (readiness, one
log line) at start and on every reload; Allocate still answers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from aiodp.config import configfile
from aiodp.config.model import Config
from aiodp.gpus.devices import Device

log = logging.getLogger(__name__)

SPEC_SUFFIXES: Final = (".json", ".yaml", ".yml")
MAX_SPECS: Final = 256
"""Spec files read per directory: a node has a handful."""


def expected_names(devices: Iterable[Device], config: Config, imex: Sequence[int]) -> set[str]:
    """The CDI names Allocate hands out for these devices (pure)."""
    ids = {d.index if config.device_id_strategy == "index" else d.uuid for d in devices}
    vendor = config.cdi_kind.partition("/")[0]
    return {f"{config.cdi_kind}={i}" for i in ids} | {f"{vendor}/imex-channel={c}" for c in imex}


def defined_names(dirs: Sequence[Path], limit: int) -> set[str]:
    """Every `<kind>=<device>` the spec files in `dirs` define; blocking (run in a thread).
    Unreadable or malformed files are skipped with a log line."""
    names: set[str] = set()
    for directory in dirs:
        try:
            entries = sorted(os.listdir(directory))[:MAX_SPECS]
        except OSError:
            continue
        for entry in entries:
            if entry.endswith(SPEC_SUFFIXES):
                names |= _spec_names(directory / entry, limit)
    return names


def _spec_names(path: Path, limit: int) -> set[str]:
    try:
        doc = configfile.load_yaml(configfile.read_bounded(path, limit))  # JSON is YAML too
    except (OSError, configfile.ConfigFileError, configfile.YAMLError) as e:
        log.warning("CDI spec %s skipped: %s", path, str(e).splitlines()[0][:200])
        return set()
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        return set()
    kind = doc["kind"]
    raw = doc.get("devices")
    devices = raw if isinstance(raw, list) else []
    return {
        f"{kind}={d['name']}"
        for d in devices
        if isinstance(d, dict) and isinstance(d.get("name"), str)
    }


def uses_cdi(config: Config) -> bool:
    return any(s.startswith("cdi-") for s in config.device_list_strategy)
