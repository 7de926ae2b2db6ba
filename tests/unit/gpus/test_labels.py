"""GPU Feature Discovery's labels from our discovery: the keys and value formats of GFD v0.20
(its expected-output sets for MIG none, single and mixed) and the values GFD's rules give
for the same devices."""

from __future__ import annotations

import dataclasses
import re

import pytest

from aiodp.config.configfile import SharedResource, Sharing
from aiodp.config.model import Config
from aiodp.gpus import labels
from aiodp.gpus.backend import DeviceInfo, MigInfo
from aiodp.gpus.simulated import parse
from aiodp.standins.testbed import h100_node

NOW = 1796630400

# GFD's label set and value formats (from its tests' expected outputs and README, written
# here as key -> value pattern); `mig-P` stands for each MIG profile in mixed.
COMMON = {
    "gfd.timestamp": r"[0-9]{10}",
    "cuda.driver.major": r"[0-9]+",
    "cuda.driver.minor": r"[0-9]+",
    "cuda.driver.rev": r"[0-9]*",
    "cuda.runtime.major": r"[0-9]+",
    "cuda.runtime.minor": r"[0-9]+",
    "cuda.driver-version.major": r"[0-9]+",
    "cuda.driver-version.minor": r"[0-9]+",
    "cuda.driver-version.revision": r"[0-9]*",
    "cuda.driver-version.full": r"[0-9]+\.[0-9]+(\.[0-9]+)?",
    "cuda.runtime-version.major": r"[0-9]+",
    "cuda.runtime-version.minor": r"[0-9]+",
    "cuda.runtime-version.full": r"[0-9]+\.[0-9]+",
    "gpu.machine": r".*",
    "gpu.count": r"[0-9]+",
    "gpu.replicas": r"[0-9]+",
    "gpu.sharing-strategy": r"none|mps|time-slicing",
    "gpu.product": r"[A-Za-z0-9_.-]+",
    "gpu.memory": r"[0-9]+",
    "gpu.family": r"[a-z-]+",
    "gpu.mode": r"unknown|compute|graphics",
    "mig.capable": r"true|false",
    "gpu.compute.major": r"[0-9]+",
    "gpu.compute.minor": r"[0-9]+",
    "mps.capable": r"true|false",
}
MIG_ATTRS = {
    "multiprocessors": r"[0-9]+",
    "engines.copy": r"[0-9]+",
    "engines.decoder": r"[0-9]+",
    "engines.encoder": r"[0-9]+",
    "engines.jpeg": r"[0-9]+",
    "engines.ofa": r"[0-9]+",
    "slices.gi": r"[0-9]+",
    "slices.ci": r"[0-9]+",
}
SINGLE = {**COMMON, "mig.strategy": r"single", **{f"gpu.{k}": v for k, v in MIG_ATTRS.items()}}
MIXED = {
    **COMMON,
    "mig.strategy": r"mixed",
    **{
        f"mig-P.{k}": v
        for k, v in {
            "product": r"[A-Za-z0-9_.-]+", "count": r"[0-9]+", "replicas": r"[0-9]+",
            "sharing-strategy": r"none|mps|time-slicing", "memory": r"[0-9]+", **MIG_ATTRS,
        }.items()
    },
}  # fmt: skip


def matches_gfd(got: dict[str, str], expected: dict[str, str], profiles: list[str]) -> None:
    """Exactly GFD's keys, each value in GFD's format."""
    want = {}
    for key, pattern in expected.items():
        for p in profiles if key.startswith("mig-P.") else [None]:
            full = "nvidia.com/" + (key.replace("mig-P", f"mig-{p}") if p else key)
            want[full] = pattern
    assert sorted(got) == sorted(want)
    for key, pattern in want.items():
        assert re.fullmatch(pattern, got[key]), (key, got[key])


def a100(i: int, migs: tuple[MigInfo, ...] = ()) -> DeviceInfo:
    return DeviceInfo(
        uuid=f"GPU-a100-{i}", index=i, minor=i, name="NVIDIA A100-SXM4-40GB", memory_mib=40960,
        mig_enabled=bool(migs), mig_devices=migs, mig_capable=True, pci_class=0x030200,
        cuda_compute_capability="8.0", driver_version="550.54.15", cuda_driver_version="12.4",
    )  # fmt: skip


def mig(uuid: str, profile: str, slices: int, memory: int, sms: int) -> MigInfo:
    return MigInfo(
        uuid, profile, gi=slices, ci=0, memory_mb=memory, multiprocessors=sms,
        gi_slices=slices, ci_slices=slices, engines=(1, slices, 0, 0, 0),
    )  # fmt: skip


def test_labels_8_h100_equal_gfds() -> None:
    gpus = parse(h100_node(), "d.yaml").gpus
    got = labels.labels(gpus, Config(), machine="NVIDIA DGX H100", timestamp=NOW)
    matches_gfd(got, COMMON, [])
    assert got == {
        "nvidia.com/gfd.timestamp": str(NOW),
        "nvidia.com/cuda.driver.major": "580",
        "nvidia.com/cuda.driver.minor": "95",
        "nvidia.com/cuda.driver.rev": "05",
        "nvidia.com/cuda.driver-version.major": "580",
        "nvidia.com/cuda.driver-version.minor": "95",
        "nvidia.com/cuda.driver-version.revision": "05",
        "nvidia.com/cuda.driver-version.full": "580.95.05",
        "nvidia.com/cuda.runtime.major": "13",
        "nvidia.com/cuda.runtime.minor": "0",
        "nvidia.com/cuda.runtime-version.major": "13",
        "nvidia.com/cuda.runtime-version.minor": "0",
        "nvidia.com/cuda.runtime-version.full": "13.0",
        "nvidia.com/gpu.machine": "NVIDIA-DGX-H100",
        "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.replicas": "1",
        "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.family": "hopper",
        "nvidia.com/gpu.compute.major": "9",
        "nvidia.com/gpu.compute.minor": "0",
        "nvidia.com/gpu.mode": "compute",
        "nvidia.com/mig.capable": "true",
        "nvidia.com/mps.capable": "false",
    }
    assert labels.owned(got) == list(got)


def test_labels_mig_mixed_a100_equal_gfds() -> None:
    small = [mig(f"MIG-{n}", "1g.5gb", 1, 4864, 14) for n in range(2)]
    gpus = [
        a100(0, (*small, mig("MIG-2", "2g.10gb", 2, 9856, 28))),
        a100(1),
    ]
    got = labels.labels(gpus, Config(mig_strategy="mixed"), machine="", timestamp=NOW)
    matches_gfd(got, MIXED, ["1g.5gb", "2g.10gb"])
    assert got["nvidia.com/mig.strategy"] == "mixed"
    assert got["nvidia.com/gpu.machine"] == "unknown"
    # the whole GPU that is not in MIG mode wins the nvidia.com/gpu labels
    assert got["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert got["nvidia.com/gpu.count"] == "2"  # every A100, as GFD counts by model
    assert got["nvidia.com/gpu.replicas"] == "1"
    assert got["nvidia.com/mig-1g.5gb.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"
    assert got["nvidia.com/mig-1g.5gb.count"] == "2"
    assert got["nvidia.com/mig-1g.5gb.memory"] == "4864"
    assert got["nvidia.com/mig-1g.5gb.multiprocessors"] == "14"
    assert got["nvidia.com/mig-2g.10gb.engines.decoder"] == "2"
    assert got["nvidia.com/mig-2g.10gb.slices.gi"] == "2"
    assert got["nvidia.com/gpu.family"] == "ampere"


def test_labels_mig_single() -> None:
    gpus = [a100(i, tuple(mig(f"MIG-{i}-{n}", "1g.5gb", 1, 4864, 14) for n in range(7)))
            for i in range(2)]  # fmt: skip
    got = labels.labels(gpus, Config(mig_strategy="single"), machine="x", timestamp=NOW)
    matches_gfd(got, SINGLE, [])
    assert got["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"
    assert got["nvidia.com/gpu.count"] == "14"
    assert got["nvidia.com/gpu.memory"] == "4864"
    assert got["nvidia.com/gpu.replicas"] == "1"


def test_labels_mig_single_invalid_node() -> None:
    gpus = [a100(0, (mig("MIG-0", "1g.5gb", 1, 4864, 14),)), a100(1)]  # MIG and not
    got = labels.labels(gpus, Config(mig_strategy="single"), machine="x", timestamp=None)
    assert got["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB-MIG-INVALID"
    assert got["nvidia.com/gpu.count"] == "0"
    assert got["nvidia.com/gpu.replicas"] == "0"
    assert got["nvidia.com/gpu.memory"] == "0"
    assert "nvidia.com/gfd.timestamp" not in got


@pytest.mark.parametrize(
    ("method", "rename_by_default", "product", "strategy"),
    [
        ("time-slicing", False, "NVIDIA-H100-80GB-HBM3-SHARED", "time-slicing"),
        ("time-slicing", True, "NVIDIA-H100-80GB-HBM3", "time-slicing"),
        ("mps", False, "NVIDIA-H100-80GB-HBM3-SHARED", "mps"),
    ],
)
def test_labels_shared(method: str, rename_by_default: bool, product: str, strategy: str) -> None:
    gpus = parse(h100_node(), "d.yaml").gpus
    sharing = Sharing(
        method=method,  # type: ignore[arg-type]
        rename_by_default=rename_by_default,
        resources=(SharedResource("nvidia.com/gpu", 4),),
    )
    got = labels.labels(gpus, Config(sharing=sharing), machine="x", timestamp=NOW)
    matches_gfd(got, COMMON, [])
    assert got["nvidia.com/gpu.product"] == product
    assert got["nvidia.com/gpu.replicas"] == "4"
    assert got["nvidia.com/gpu.sharing-strategy"] == strategy
    assert got["nvidia.com/mps.capable"] == str(method == "mps").lower()


def test_labels_grace_hopper_with_a_fabric_clique() -> None:
    gh200 = DeviceInfo(
        uuid="GPU-gh", index=0, minor=0, name="NVIDIA GH200 480GB", memory_mib=97871,
        pci_class=0x030200, cuda_compute_capability="9.0", driver_version="570.124.06",
        cuda_driver_version="12.8", fabric="4a7c0c8e-7f4d-4c1e-9a34-5e2f0d1b6a10.1",
    )  # fmt: skip
    other = dataclasses.replace(gh200, uuid="GPU-gh2", index=1)
    got = labels.labels([gh200, other], Config(), machine="GH200 Grace Hopper", timestamp=NOW)
    assert got["nvidia.com/gpu.product"] == "NVIDIA-GH200-480GB"
    assert got["nvidia.com/gpu.family"] == "hopper"
    assert got["nvidia.com/gpu.clique"] == "4a7c0c8e-7f4d-4c1e-9a34-5e2f0d1b6a10.1"
    assert got["nvidia.com/gpu.machine"] == "GH200-Grace-Hopper"
    split = dataclasses.replace(other, fabric="4a7c0c8e-7f4d-4c1e-9a34-5e2f0d1b6a10.2")
    assert "nvidia.com/gpu.clique" not in labels.labels(
        [gh200, split], Config(), machine="x", timestamp=NOW
    )  # two cliques: GFD writes none


def test_labels_mode_family_and_sanitising() -> None:
    assert labels.sanitise("NVIDIA  RTX (TM) 6000 Ada/Gen") == "NVIDIA-RTX-TM-6000-AdaGen"
    assert [labels.family(*cc) for cc in ((7, 0), (7, 5), (8, 6), (8, 9), (10, 0), (12, 0))] == [
        "volta", "turing", "ampere", "ada-lovelace", "blackwell", "blackwell",
    ]  # fmt: skip
    assert labels.family(4, 0) == "undefined"
    g = parse(h100_node(), "d.yaml").gpus[0]
    mixed = [g, dataclasses.replace(g, uuid="x", pci_class=0x030000)]
    assert labels.labels(mixed, Config(), machine="x", timestamp=None)["nvidia.com/gpu.mode"] == (
        "unknown"
    )
    assert labels.labels([], Config(), machine="x", timestamp=NOW) == {}


def test_labels_owns_only_gfds_keys() -> None:
    others = [
        "nvidia.com/gpu.present", "nvidia.com/gpu.deploy.device-plugin",
        "nvidia.com/mig.config", "nvidia.com/mig.config.state", "nvidia.com/device-plugin.config",
        "feature.node.kubernetes.io/pci-10de.present", "nvidia.com/gpu.product.extra",
    ]  # fmt: skip
    assert labels.owned(others) == []
    assert labels.owned(["nvidia.com/mig-3g.20gb.count", "nvidia.com/gpu.engines.ofa"]) == [
        "nvidia.com/mig-3g.20gb.count",
        "nvidia.com/gpu.engines.ofa",
    ]
