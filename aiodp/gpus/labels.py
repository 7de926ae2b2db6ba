"""Which node labels this node's GPUs earn: NVIDIA GPU Feature Discovery's set (v0.20), from
our own discovery and config (pure).

The same keys and value formats as GFD's `internal/lm`: the driver and CUDA versions, the
machine type, the product (sanitised; `-SHARED` when replicated and not renamed,
`-MIG-<profile>` with MIG single), count, replicas, sharing strategy, memory, family and
compute capability, the PCI mode, MIG and MPS capability, the MIG strategy and each MIG
profile's attributes, the fabric clique, and a timestamp. `OWNED` says which keys are ours:
the publisher never touches any other.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Final

from aiodp.config.configfile import SharedResource, Sharing
from aiodp.config.model import RESOURCE_GPU, Config
from aiodp.gpus.backend import DeviceInfo, MigInfo

PREFIX: Final = "nvidia.com/"
_ATTRS: Final = (
    r"product|count|replicas|sharing-strategy|memory|multiprocessors|slices\.gi|slices\.ci"
    r"|engines\.(copy|decoder|encoder|jpeg|ofa)"
)
OWNED: Final = re.compile(
    r"^nvidia\.com/("
    r"gfd\.timestamp|mig\.capable|mig\.strategy|mps\.capable"
    r"|cuda\.(driver|runtime)\.(major|minor|rev)"
    r"|cuda\.driver-version\.(major|minor|revision|full)|cuda\.runtime-version\.(major|minor|full)"
    rf"|gpu\.(machine|mode|clique|family|compute\.major|compute\.minor|{_ATTRS})"
    rf"|mig-[0-9a-z.+]+\.({_ATTRS})"
    r")$"
)
"""The label keys GPU Feature Discovery writes, and so ours: `nvidia.com/gpu.present`,
`nvidia.com/gpu.deploy.*`, `nvidia.com/mig.config*` and `nvidia.com/device-plugin.config`
belong to others and are never touched."""
TIMESTAMP: Final = PREFIX + "gfd.timestamp"
VGA_CLASS: Final = 0x030000
COMPUTE_CLASS: Final = 0x030200
ENGINE_NAMES: Final = ("copy", "decoder", "encoder", "jpeg", "ofa")


def sanitise(text: str) -> str:
    """GFD's rule: characters outside `[A-Za-z0-9-_. ]` dropped, blank runs become `-`."""
    return "-".join(re.sub(r"[^A-Za-z0-9\-_. ]", "", text).split())


def family(major: int, minor: int) -> str:
    """The architecture family GFD names for a compute capability."""
    if major == 7:
        return "volta" if minor < 5 else "turing"
    if major == 8:
        return "ampere" if minor < 9 else "ada-lovelace"
    names = {1: "tesla", 2: "fermi", 3: "kepler", 5: "maxwell", 6: "pascal", 9: "hopper",
             10: "blackwell", 12: "blackwell", 13: "rubin"}  # fmt: skip
    return names.get(major, "undefined")


def labels(
    gpus: Sequence[DeviceInfo],
    config: Config,
    *,
    machine: str,
    timestamp: int | None,
    lost: Collection[str] = (),
) -> dict[str, str]:
    """GFD's labels for these GPUs under `config`, those in `lost` (gone from the bus: NVML
    no longer enumerates them for GFD) left out; `timestamp` None leaves it out (GFD's
    `--no-timestamp`). No GPUs: no labels."""
    gpus = [g for g in gpus if g.uuid not in lost]
    if not gpus:
        return {}
    out: dict[str, str] = {}
    if timestamp is not None:
        out[TIMESTAMP] = str(timestamp)
    out.update(_versions(gpus[0]))
    out[PREFIX + "gpu.machine"] = sanitise(machine) or "unknown"
    out[PREFIX + "mig.capable"] = str(any(g.mig_capable for g in gpus)).lower()
    mps = config.sharing is not None and config.sharing.method == "mps"
    out[PREFIX + "mps.capable"] = str(mps and not any(g.mig_enabled for g in gpus)).lower()
    out.update(_full_gpus(gpus, config.sharing))
    if config.mig_strategy != "none":
        out[PREFIX + "mig.strategy"] = config.mig_strategy
        out.update(_migs(gpus, config))
    out[PREFIX + "gpu.mode"] = _mode(gpus)
    clique = _clique(gpus)
    if clique:
        out[PREFIX + "gpu.clique"] = clique
    return out


def _versions(gpu: DeviceInfo) -> dict[str, str]:
    out: dict[str, str] = {}
    parts = gpu.driver_version.split(".")
    if 2 <= len(parts) <= 3 and all(p.isdigit() for p in parts):
        values = (parts[0], parts[1], parts[2] if len(parts) == 3 else "")
        # the deprecated cuda.driver.* keys say `rev`, the new ones `revision`
        for old, new, value in zip(("major", "minor", "rev"), ("major", "minor", "revision"),
                                   values, strict=True):  # fmt: skip
            out[f"{PREFIX}cuda.driver.{old}"] = value
            out[f"{PREFIX}cuda.driver-version.{new}"] = value
        out[PREFIX + "cuda.driver-version.full"] = gpu.driver_version
    cuda = gpu.cuda_driver_version.split(".")
    if len(cuda) == 2 and all(p.isdigit() for p in cuda):
        for part, value in zip(("major", "minor"), cuda, strict=True):
            out[f"{PREFIX}cuda.runtime.{part}"] = value
            out[f"{PREFIX}cuda.runtime-version.{part}"] = value
        out[PREFIX + "cuda.runtime-version.full"] = gpu.cuda_driver_version
    return out


def _entry(sharing: Sharing | None, resource: str) -> SharedResource | None:
    if sharing is None:
        return None
    return next((r for r in sharing.resources if r.name == resource), None)


def _base(
    resource: str, sharing: Sharing | None, count: int, parts: Sequence[str], shared_off: bool
) -> dict[str, str]:
    """product, count, replicas and sharing-strategy of one resource, as GFD words them."""
    entry = None if shared_off else _entry(sharing, resource)
    replicas = 0 if shared_off else (entry.replicas if entry is not None else 1)
    shared = entry is not None and entry.replicas > 1
    renamed = (
        entry is not None
        and sharing is not None
        and (bool(entry.rename) or sharing.rename_by_default)
    )
    product = [sanitise(p) for p in parts if p]
    if shared and not renamed:
        product.append("SHARED")
    strategy = sharing.method if shared and sharing is not None else "none"
    return {
        f"{resource}.product": "-".join(product),
        f"{resource}.count": str(count),
        f"{resource}.replicas": str(replicas),
        f"{resource}.sharing-strategy": strategy,
    }


def _full_gpus(gpus: Sequence[DeviceInfo], sharing: Sharing | None) -> dict[str, str]:
    """`nvidia.com/gpu.*` from the whole GPUs: MIG-enabled models first, without sharing, then
    the others (which win where both exist); models in name order, the last one winning (GFD
    warns about more than one model and keeps one, in map order)."""
    counts: dict[str, int] = {}
    for g in gpus:
        counts[g.name] = counts.get(g.name, 0) + 1
    out: dict[str, str] = {}
    for mig_enabled in (True, False):
        for name in sorted({g.name for g in gpus if g.mig_enabled is mig_enabled}):
            g = next(x for x in gpus if x.name == name and x.mig_enabled is mig_enabled)
            out.update(_base(RESOURCE_GPU, sharing, counts[name], [name], mig_enabled))
            if g.memory_mib:
                out[RESOURCE_GPU + ".memory"] = str(g.memory_mib)
            out.update(_architecture(g))
    return out


def _architecture(g: DeviceInfo) -> dict[str, str]:
    major, _, minor = g.cuda_compute_capability.partition(".")
    if not (major.isdigit() and minor.isdigit()) or int(major) == 0:
        return {}
    return {
        RESOURCE_GPU + ".family": family(int(major), int(minor)),
        RESOURCE_GPU + ".compute.major": major,
        RESOURCE_GPU + ".compute.minor": minor,
    }


def _mig_attributes(resource: str, m: MigInfo) -> dict[str, str]:
    out = {
        f"{resource}.memory": str(m.memory_mb),
        f"{resource}.multiprocessors": str(m.multiprocessors),
        f"{resource}.slices.gi": str(m.gi_slices),
        f"{resource}.slices.ci": str(m.ci_slices),
    }
    for name, count in zip(ENGINE_NAMES, m.engines, strict=True):
        out[f"{resource}.engines.{name}"] = str(count)
    return out


def _migs(gpus: Sequence[DeviceInfo], config: Config) -> dict[str, str]:
    enabled = [g for g in gpus if g.mig_enabled]
    if not enabled:
        return {}
    by_profile: dict[str, list[tuple[DeviceInfo, MigInfo]]] = {}
    for g in enabled:
        for m in g.mig_devices:
            by_profile.setdefault(m.profile.replace("+", "."), []).append((g, m))
    if config.mig_strategy == "single":
        if (
            any(not g.mig_devices for g in enabled)
            or len(enabled) != len(gpus)
            or len(by_profile) != 1
        ):
            return _invalid_single(enabled[0])
        resources = {RESOURCE_GPU: next(iter(by_profile.items()))}
    else:
        resources = {f"{PREFIX}mig-{p}": (p, devs) for p, devs in by_profile.items()}
    out: dict[str, str] = {}
    for resource, (profile, devices) in sorted(resources.items()):
        parent, first = devices[0]
        out.update(
            _base(resource, config.sharing, len(devices), [parent.name, "MIG", profile], False)
        )
        out.update(_mig_attributes(resource, first))
    return out


def _invalid_single(gpu: DeviceInfo) -> dict[str, str]:
    """GFD's labels for a node MIG single cannot serve (mixed, empty or several profiles)."""
    return {
        RESOURCE_GPU + ".product": "-".join((sanitise(gpu.name), "MIG", "INVALID")),
        RESOURCE_GPU + ".count": "0",
        RESOURCE_GPU + ".replicas": "0",
        RESOURCE_GPU + ".sharing-strategy": "",
        RESOURCE_GPU + ".memory": "0",
    }


def _mode(gpus: Sequence[DeviceInfo]) -> str:
    """`compute` or `graphics` when every GPU's PCI class says so; `unknown` otherwise."""
    classes = {g.pci_class for g in gpus}
    if len(classes) != 1 or None in classes:
        return "unknown"
    return {COMPUTE_CLASS: "compute", VGA_CLASS: "graphics"}.get(classes.pop() or 0, "unknown")


def _clique(gpus: Sequence[DeviceInfo]) -> str:
    """`<cluster>.<clique>` when every fabric-attached GPU agrees on both (GFD's rule)."""
    ids = {g.fabric for g in gpus if g.fabric}
    clusters = {i.rsplit(".", 1)[0] for i in ids}
    cliques = {i.rsplit(".", 1)[-1] for i in ids}
    return ids.pop() if len(clusters) == 1 and len(cliques) == 1 else ""


def owned(keys: Mapping[str, str] | Sequence[str]) -> list[str]:
    """Which of these label keys are ours (GFD's)."""
    return [k for k in keys if OWNED.match(k)]
