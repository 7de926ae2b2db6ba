"""Resources and device IDs per MIG strategy and sharing config; the request rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from aiodp.config import configfile
from aiodp.config.model import AllocationPolicy, Config
from aiodp.deviceplugin import allocate
from aiodp.gpus import edits, sharing, topology
from aiodp.gpus.backend import DeviceInfo, MigInfo
from aiodp.gpus.devices import Inventory, Resource
from aiodp.kit.errors import ConfigError, InvalidRequest


def gpu(i: int, *migs: str, name: str = "NVIDIA A100-SXM4-80GB") -> DeviceInfo:
    mig = tuple(
        MigInfo(f"MIG-{i}-{n}", p, gi=n + 1, ci=0, index=n,
                paths=(f"/dev/nvidia-caps/nvidia-cap{10 * i + n}",
                       f"/dev/nvidia-caps/nvidia-cap{10 * i + n + 5}"))
        for n, p in enumerate(migs)
    )  # fmt: skip
    return DeviceInfo(
        uuid=f"GPU-{i}", index=i, minor=i, name=name, memory_mib=81920, numa_node=0,
        paths=(f"/dev/nvidia{i}",), mig_enabled=bool(migs), mig_devices=mig,
    )  # fmt: skip


MIXED_NODE = [gpu(0), gpu(1, "1g.10gb", "1g.10gb", "2g.20gb"), gpu(2, "3g.40gb", "1c.3g.40gb")]


def conf(text: str = "", **flags: Any) -> Config:
    f = configfile.parse(text)
    return dataclasses.replace(
        Config(), sharing=f.sharing, gpu_names=f.gpu_names, mig_names=f.mig_names, **flags
    )


def resource_of(plan: sharing.Plan, name: str) -> Resource:
    return next(r for r in plan.resources if r.name == name)


def names(plan: sharing.Plan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in plan.devices:
        out.setdefault(d.resource, []).append(d.id)
    return out


def test_sharing_mig_none_advertises_whole_gpus() -> None:
    plan = sharing.plan(MIXED_NODE, conf())
    assert names(plan) == {"nvidia.com/gpu": ["GPU-0", "GPU-1", "GPU-2"]}
    assert plan.resources[0].kind == "gpu"


def test_sharing_mig_mixed_names_per_profile() -> None:
    plan = sharing.plan(MIXED_NODE, conf(mig_strategy="mixed"))
    assert names(plan) == {
        "nvidia.com/gpu": ["GPU-0"],
        "nvidia.com/mig-1g.10gb": ["MIG-1-0", "MIG-1-1"],
        "nvidia.com/mig-2g.20gb": ["MIG-1-2"],
        "nvidia.com/mig-3g.40gb": ["MIG-2-0"],  # 1c.3g.40gb: a partial compute instance
    }
    mig = next(d for d in plan.devices if d.id == "MIG-1-1")
    assert mig.index == "1:1"
    assert mig.gpu == "GPU-1"
    assert mig.paths == (
        "/dev/nvidia1",
        "/dev/nvidia-caps/nvidia-cap11",
        "/dev/nvidia-caps/nvidia-cap16",
    )
    assert resource_of(plan, "nvidia.com/mig-2g.20gb").kind == "mig"


def test_sharing_mig_mixed_name_patterns() -> None:
    text = (
        "resources: {mig: [{pattern: '1g.*', name: mig-small}],"
        " gpus: [{pattern: '*A100*', name: a100}]}"
    )
    plan = sharing.plan(MIXED_NODE, conf(text, mig_strategy="mixed"))
    assert set(names(plan)) == {
        "nvidia.com/a100",
        "nvidia.com/mig-small",
        "nvidia.com/mig-2g.20gb",
        "nvidia.com/mig-3g.40gb",
    }


def test_sharing_mig_single() -> None:
    node = [gpu(0, "1g.10gb", "1g.10gb"), gpu(1, "1g.10gb")]
    plan = sharing.plan(node, conf(mig_strategy="single"))
    assert names(plan) == {"nvidia.com/gpu": ["MIG-0-0", "MIG-0-1", "MIG-1-0"]}
    assert sharing.plan([gpu(0), gpu(1)], conf(mig_strategy="single")).devices[0].id == "GPU-0"


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ([gpu(0), gpu(1, "1g.10gb")], "mixes MIG-enabled and non-MIG GPUs"),
        ([gpu(0, "1g.10gb"), gpu(1, "2g.20gb")], "more than one MIG device type present"),
        ([gpu(0, "1g.10gb"), dataclasses.replace(gpu(1), mig_enabled=True)], "have no MIG devices"),
    ],
)
def test_sharing_mig_single_refusals(node: list[DeviceInfo], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sharing.plan(node, conf(mig_strategy="single"))


TS = "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 3}]}}"
TS_RENAME = "sharing: {timeSlicing: {renameByDefault: true, "


def test_sharing_replicas_ids() -> None:
    plan = sharing.plan([gpu(0), gpu(1)], conf(TS))
    assert names(plan) == {
        "nvidia.com/gpu": ["GPU-0::0", "GPU-0::1", "GPU-0::2", "GPU-1::0", "GPU-1::1", "GPU-1::2"]
    }
    r = resource_of(plan, "nvidia.com/gpu")
    assert (r.sharing, r.replicas, r.fail_requests_greater_than_one) == ("time-slicing", 3, False)
    assert {d.uuid for d in plan.devices} == {"GPU-0", "GPU-1"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            TS_RENAME + "resources: [{name: gpu, replicas: 2}]}}",
            {"nvidia.com/gpu.shared": 4},
        ),
        (
            "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2, rename: gpu-ts}]}}",
            {"nvidia.com/gpu-ts": 4},
        ),
        (
            TS_RENAME + "resources: [{name: gpu, replicas: 2, devices: 1}]}}",
            {"nvidia.com/gpu.shared": 2, "nvidia.com/gpu": 1},
        ),
        (
            TS_RENAME + "resources: [{name: gpu, replicas: 4, devices: [GPU-1]}]}}",
            {"nvidia.com/gpu.shared": 4, "nvidia.com/gpu": 1},
        ),
        (
            "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2, devices: ['1']}]}}",
            {"nvidia.com/gpu": 3},
        ),  # GPU 1 shared, GPU 0 whole, both under one name
    ],
)
def test_sharing_rename_and_per_gpu_selection(text: str, expected: dict[str, int]) -> None:
    plan = sharing.plan([gpu(0), gpu(1)], conf(text))
    assert {k: len(v) for k, v in names(plan).items()} == expected


def test_sharing_mig_replicas_by_mig_index() -> None:
    text = (
        "sharing: {timeSlicing: {resources: [{name: mig-1g.10gb, replicas: 2, devices: ['1:1']}]}}"
    )
    plan = sharing.plan(MIXED_NODE, conf(text, mig_strategy="mixed"))
    assert names(plan)["nvidia.com/mig-1g.10gb"] == ["MIG-1-0", "MIG-1-1::0", "MIG-1-1::1"]


def inventory(plan: sharing.Plan) -> Inventory:
    return Inventory.of(plan.devices, 1)


def test_sharing_two_replicas_of_one_gpu_yield_it_once() -> None:
    plan = sharing.plan([gpu(0), gpu(1)], conf(TS))
    r = allocate.build_response(
        ["GPU-0::1", "GPU-0::2", "GPU-1::0"], inventory(plan), plan.resources[0], Config()
    )
    assert r.envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-0,GPU-1"


def test_sharing_fail_requests_greater_than_one() -> None:
    text = (
        "sharing: {timeSlicing: {failRequestsGreaterThanOne: true,"
        " resources: [{name: gpu, replicas: 2}]}}"
    )
    plan = sharing.plan([gpu(0), gpu(1)], conf(text))
    res = plan.resources[0]
    ok = allocate.build_response(["GPU-1::1"], inventory(plan), res, Config())
    assert ok.envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-1"
    with pytest.raises(InvalidRequest, match="maximum for a shared resource is 1"):
        allocate.build_response(["GPU-0::0", "GPU-1::0"], inventory(plan), res, Config())


def test_sharing_mps_environment_and_mounts() -> None:
    text = "sharing: {mps: {resources: [{name: gpu, replicas: 4}]}}"
    config = conf(text, mps_root=__import__("pathlib").Path("/run/nvidia/mps"))
    plan = sharing.plan([gpu(0)], config)
    assert plan.resources[0].fail_requests_greater_than_one
    r = allocate.build_response(["GPU-0::2"], inventory(plan), plan.resources[0], config)
    assert r.envs == {
        "CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=20480M",
        "NVIDIA_VISIBLE_DEVICES": "GPU-0",
    }
    assert [(m.host_path, m.container_path) for m in r.mounts] == [
        ("/run/nvidia/mps/nvidia.com/gpu/pipe", "/mps/nvidia.com/gpu/pipe"),
        ("/run/nvidia/mps/shm", "/dev/shm"),
    ]


def test_sharing_mps_refuses_mig() -> None:
    text = "sharing: {mps: {resources: [{name: gpu, replicas: 2}]}}"
    with pytest.raises(ConfigError, match="MIG devices cannot be shared with MPS"):
        sharing.plan([gpu(0, "1g.10gb")], conf(text, mig_strategy="single"))


def test_sharing_mig_device_specs() -> None:
    plan = sharing.plan(MIXED_NODE, conf(mig_strategy="mixed"))
    res = resource_of(plan, "nvidia.com/mig-2g.20gb")
    r = allocate.build_response(
        ["MIG-1-2"], inventory(plan), res, Config(pass_device_specs=True), ("/dev/nvidiactl",)
    )
    assert [d.host_path for d in r.devices] == [
        "/dev/nvidiactl",
        "/dev/nvidia1",
        "/dev/nvidia-caps/nvidia-cap12",
        "/dev/nvidia-caps/nvidia-cap17",
    ]
    assert r.envs["NVIDIA_VISIBLE_DEVICES"] == "MIG-1-2"
    cdi = allocate.build_response(
        ["MIG-1-2"], inventory(plan), res, Config(device_list_strategy=("cdi-cri",))
    )
    assert [c.name for c in cdi.cdi_devices] == ["nvidia.com/gpu=MIG-1-2"]
    idx = allocate.build_response(
        ["MIG-1-2"], inventory(plan), res, Config(device_id_strategy="index")
    )
    assert idx.envs["NVIDIA_VISIBLE_DEVICES"] == "1:2"


def grouped(
    plan: sharing.Plan,
    resource: str,
    available: Sequence[str],
    must: Sequence[str],
    size: int,
    policy: AllocationPolicy,
) -> list[str]:
    """The preferred allocation the plugin answers for a shared or MIG resource."""
    inventory = Inventory.of(plan.devices, 1)
    return edits.preferred(available, must, size, inventory, resource, topology.Topology(), policy)


def test_sharing_replica_policies_are_deterministic() -> None:
    plan = sharing.plan([gpu(0), gpu(1), gpu(2)], conf(TS))
    ids = [d.id for d in plan.devices]
    taken = {"GPU-0::0"}  # one replica of GPU 0 is in use elsewhere
    available = [i for i in ids if i not in taken]
    assert grouped(plan, "nvidia.com/gpu", available, [], 3, "distributed") == [
        "GPU-1::0",
        "GPU-2::0",
        "GPU-0::1",
    ]
    assert grouped(plan, "nvidia.com/gpu", available, [], 3, "packed") == [
        "GPU-0::1",
        "GPU-0::2",
        "GPU-1::0",
    ]
    assert grouped(plan, "nvidia.com/gpu", available[::-1], ["GPU-2::2"], 2, "distributed") == [
        "GPU-2::2",
        "GPU-1::0",
    ]


def test_sharing_mig_preferred_by_parent_gpu() -> None:
    node = [gpu(0, "1g.10gb", "1g.10gb"), gpu(1, "1g.10gb", "1g.10gb")]
    plan = sharing.plan(node, conf(mig_strategy="mixed"))
    res = "nvidia.com/mig-1g.10gb"
    available = ["MIG-0-1", "MIG-1-0", "MIG-1-1"]  # MIG-0-0 in use
    assert grouped(plan, res, available, [], 1, "packed") == ["MIG-0-1"]  # fill GPU 0 first
    assert grouped(plan, res, available, [], 1, "distributed") == ["MIG-1-0"]  # spread


def test_sharing_refuses_a_socket_path_too_long_for_a_resource() -> None:
    from pathlib import Path

    deep = Path("/" + "d" * 60) / "kubelet.sock"  # fine for aiodp-nvidia-gpu.sock
    text = (
        "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2, rename: " + "g" * 40 + "}]}}"
    )
    with pytest.raises(ConfigError, match="is longer than 107 bytes"):
        sharing.plan([gpu(0)], conf(text, kubelet_socket=deep))
    assert sharing.plan([gpu(0)], conf(kubelet_socket=deep)).resources
