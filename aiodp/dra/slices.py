"""What this node publishes to DRA: its ResourceSlices, device by device (pure).

One pool per node, named after the node. A device is a whole GPU, or a MIG device where the
MIG strategy makes them; its attributes follow NVIDIA's DRA driver where it has one. The
bodies are plain dicts for `resource.k8s.io/v1` (and v1beta2, which is as flat); `for_version`
nests them under `basic` for v1beta1. No I/O: `publisher.py` sends them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiodp.gpus import sharing
from aiodp.gpus.backend import DeviceInfo, MigInfo, sysfs_bdf
from aiodp.gpus.devices import Device, Health, Kind
from aiodp.gpus.topology import Topology

MAX_DEVICES_PER_SLICE: Final = 128
"""The API's limit on devices in one ResourceSlice."""
MAX_ATTRIBUTES: Final = 32
STANDARD: Final = "resource.kubernetes.io/"
"""Kubernetes' standard device attributes (KEP-6072, GA in 1.37): pciBusID, pcieRoot and
numaNode, so that a claim can align a GPU with a NIC on one PCIe root or NUMA node; our bare
`pciBusID` and `numaNode` stay for a release, deprecated."""
"""The API's limit on attributes plus capacities of one device."""
TAINT_KEY: Final = "gpu.aiodp.io/unhealthy"
"""The DeviceTaint an Unhealthy device carries (effect NoSchedule)."""
API_VERSIONS: Final = ("v1", "v1beta2", "v1beta1")
"""resource.k8s.io versions we can write, most preferred first (1.34, 1.33, 1.32)."""


device_name: Final = sharing.dra_device_name
"""A device's DRA name (`gpu-3`, `gpu-3-mig-1`): the GPU core names it, for pod attribution too."""


def semver(text: str) -> str | None:
    """A driver or compute-capability version as the API's semantic version: `580.95.05` ->
    `580.95.5`, `9.0` -> `9.0.0`; None when it is not numbers and dots."""
    parts = text.strip().split(".")
    if not text or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    nums = [str(int(p)) for p in parts] + ["0"] * (3 - len(parts))
    return ".".join(nums)


def nvlink_islands(topo: Topology, gpus: Iterable[DeviceInfo]) -> dict[str, int]:
    """GPU UUID -> its NVLink island: the lowest GPU index among the GPUs it reaches over
    NVLink (a GPU without NVLink is its own island)."""
    infos = sorted(gpus, key=lambda g: g.index)
    island = {g.uuid: g.index for g in infos}
    changed = True
    while changed:  # a few GPUs: relax until stable
        changed = False
        for pair, links in topo.nvlinks.items():
            a, b = tuple(pair)
            if links <= 0 or a not in island or b not in island:
                continue
            low = min(island[a], island[b])
            for u in (a, b):
                if island[u] != low:
                    island[u], changed = low, True
    return island


def _attributes(dev: Device, gpu: DeviceInfo | None, island: int | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "type": {"string": "mig" if dev.kind is Kind.MIG else "gpu"},
        "uuid": {"string": dev.uuid},
    }
    gpu_index, _, mig_index = dev.index.partition(":")
    attrs["index"] = {"int": int(mig_index or gpu_index)}  # NVIDIA's driver publishes none
    if gpu is not None:
        texts = {
            "productName": gpu.name,
            "brand": gpu.brand,
            "architecture": gpu.architecture,
            "pciBusID": gpu.pci_bus_id,
        }
        attrs |= {k: {"string": v} for k, v in texts.items() if v}
        versions = {
            "cudaComputeCapability": gpu.cuda_compute_capability,
            "driverVersion": gpu.driver_version,
            "cudaDriverVersion": gpu.cuda_driver_version,
        }
        attrs |= {k: {"version": v} for k, raw in versions.items() if (v := semver(raw))}
        if dev.kind is Kind.MIG:
            attrs["parentUUID"] = {"string": gpu.uuid}
            if profile := _mig_profile(dev, gpu):
                attrs["profile"] = {"string": profile}
    if gpu is not None and gpu.pci_bus_id:
        attrs[STANDARD + "pciBusID"] = {"string": sysfs_bdf(gpu.pci_bus_id)}
    if gpu is not None and gpu.pcie_root:
        attrs[STANDARD + "pcieRoot"] = {"string": gpu.pcie_root}
    if dev.numa_node is not None:
        attrs["numaNode"] = {"int": dev.numa_node}  # deprecated: the standard name below
        attrs[STANDARD + "numaNode"] = {"int": dev.numa_node}
    if island is not None:
        attrs["nvlinkIsland"] = {"int": island}
    return attrs


def _mig_profile(dev: Device, gpu: DeviceInfo) -> str:
    """A MIG device's profile (`1g.10gb`) as its GPU lists it; empty when it does not."""
    return next((m.profile for m in gpu.mig_devices if m.uuid == dev.uuid), "")


def _mig_info(dev: Device, gpu: DeviceInfo | None) -> MigInfo | None:
    if dev.kind is not Kind.MIG or gpu is None:
        return None
    return next((m for m in gpu.mig_devices if m.uuid == dev.uuid), None)


def _memory_mib(dev: Device, gpu: DeviceInfo | None) -> int:
    """A GPU's memory as the plan carries it; a MIG device's from NVML, else its profile."""
    if dev.memory_mib or dev.kind is not Kind.MIG or gpu is None:
        return dev.memory_mib
    info = _mig_info(dev, gpu)
    if info is not None and info.memory_mb:
        return info.memory_mb  # NVML's memorySizeMB is MiB
    m = re.search(r"(\d+)gb", _mig_profile(dev, gpu))
    return int(m.group(1)) * 1024 if m else 0


MIG_ENGINES: Final = ("copyEngines", "decoders", "encoders", "jpegEngines", "ofaEngines")
"""NVIDIA's DRA capacity names of a MIG device's shared engines, in MigInfo.engines' order."""


def _mig_capacities(dev: Device, gpu: DeviceInfo | None) -> dict[str, Any]:
    """A MIG device's SMs and engines, as NVIDIA's driver publishes them; none if unknown."""
    info = _mig_info(dev, gpu)
    if info is None or not info.multiprocessors:
        return {}
    out = {"multiprocessors": {"value": str(info.multiprocessors)}}
    out |= {name: {"value": str(n)} for name, n in zip(MIG_ENGINES, info.engines, strict=True)}
    start, size = info.placement  # NVIDIA's memorySlice<i>: the slices its instance holds
    out |= {f"memorySlice{i}": {"value": "1"} for i in range(start, start + size)}
    return out


def to_slice_device(
    dev: Device, gpu: DeviceInfo | None, island: int | None, *, taints: bool
) -> dict[str, Any]:
    """One device as the v1 API writes it; an Unhealthy one carries a NoSchedule taint."""
    out: dict[str, Any] = {
        "name": device_name(dev),
        "attributes": _attributes(dev, gpu, island),
    }
    memory = _memory_mib(dev, gpu)
    capacity = _mig_capacities(dev, gpu)
    if memory:
        capacity["memory"] = {"value": f"{memory}Mi"}
    if capacity:
        out["capacity"] = capacity
    assert len(out["attributes"]) + len(out.get("capacity", {})) <= MAX_ATTRIBUTES
    if taints and dev.health is Health.UNHEALTHY:
        out["taints"] = [
            {
                "key": TAINT_KEY,
                "value": label_value(dev.reason or "unhealthy"),
                "effect": "NoSchedule",
            }
        ]
    return out


def label_value(text: str) -> str:
    """`text` as a taint value (a label value: at most 63 of [A-Za-z0-9_.-], alphanumeric at
    both ends): `XID 79 (fell off the bus)` -> `XID-79-fell-off-the-bus`."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")
    return value or "unhealthy"


@dataclass(frozen=True, slots=True)
class Pool:
    """What the node publishes: the pool name (the node), the driver and its devices."""

    node: str
    driver: str
    devices: tuple[dict[str, Any], ...]
    gpus: frozenset[str] = frozenset()
    """The physical GPUs (parent UUIDs) behind the devices."""


def pool(
    node: str,
    driver: str,
    devices: Sequence[Device],
    gpus: Mapping[str, DeviceInfo],
    topo: Topology,
    *,
    taints: bool = True,
) -> Pool:
    """The node's pool: its DRA devices, sorted by name (a stable order for updates)."""
    islands = nvlink_islands(topo, gpus.values()) if topo.nvlinks else {}
    out = [
        to_slice_device(d, gpus.get(d.gpu), islands.get(d.gpu), taints=taints)
        for d in devices
        if d.kind is not Kind.REPLICA
    ]
    return Pool(
        node,
        driver,
        tuple(sorted(out, key=lambda d: _natural(d["name"]))),
        frozenset(d.gpu for d in devices),
    )


def _natural(name: str) -> tuple[object, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def slice_name(node: str, driver: str, n: int) -> str:
    """Our n-th slice's object name: `<node>-<driver>-<n>` (fixed, so updates replace)."""
    return f"{node}-{driver.replace('.', '-')}-{n}"[:253]


def bodies(p: Pool, generation: int, version: str = "v1") -> list[dict[str, Any]]:
    """The pool as ResourceSlice objects of `resource.k8s.io/<version>`, at most 128 devices
    each; every slice carries the pool's generation and the slice count. An empty pool is
    one slice with no devices (so the scheduler sees the pool, and that it is empty)."""
    chunks = [
        p.devices[i : i + MAX_DEVICES_PER_SLICE]
        for i in range(0, len(p.devices), MAX_DEVICES_PER_SLICE)
    ] or [()]
    out = []
    for n, chunk in enumerate(chunks):
        devices = [for_version(d, version) for d in chunk]
        out.append(
            {
                "apiVersion": f"resource.k8s.io/{version}",
                "kind": "ResourceSlice",
                "metadata": {"name": slice_name(p.node, p.driver, n)},
                "spec": {
                    "driver": p.driver,
                    "nodeName": p.node,
                    "pool": {
                        "name": p.node,
                        "generation": generation,
                        "resourceSliceCount": len(chunks),
                    },
                    "devices": devices,
                },
            }
        )
    return out


def for_version(device: Mapping[str, Any], version: str) -> dict[str, Any]:
    """A v1 device as `version` writes it: v1beta1 nests all but the name under `basic`."""
    if version != "v1beta1":
        return dict(device)
    return {"name": device["name"], "basic": {k: v for k, v in device.items() if k != "name"}}


def taints_kept(sent: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
    """Whether the server kept the taints we sent (a server without DRADeviceTaints drops
    the field silently)."""

    def count(obj: Mapping[str, Any]) -> int:
        devices = (obj.get("spec") or {}).get("devices") or []
        return sum(len((d.get("basic") or d).get("taints") or []) for d in devices)

    return count(stored) >= count(sent)
