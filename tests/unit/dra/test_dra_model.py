"""The pure DRA core: the plan's split between the two APIs, the slices, and a claim's
preparation (errors per claim, the CDI spec's edits)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from aiodp.config import parsers
from aiodp.config import resolve as cfg
from aiodp.config.model import Config
from aiodp.dra import claims, slices
from aiodp.gpus import sharing, topology
from aiodp.gpus.backend import DeviceInfo, MigInfo
from aiodp.gpus.devices import Device, Health, Inventory, Kind, Uuid
from aiodp.kit.errors import ConfigError

DRIVER = "gpu.aiodp.io"


def gpu(i: int, **kw: Any) -> DeviceInfo:
    return DeviceInfo(
        uuid=f"GPU-{i}", index=i, minor=i, name="NVIDIA H100", memory_mib=81559,
        numa_node=i // 2, paths=(f"/dev/nvidia{i}",), architecture="Hopper",
        cuda_compute_capability="9.0", driver_version="580.95.05", **kw,
    )  # fmt: skip


def conf(**kw: Any) -> Config:
    return cfg.build({"dra": True, **kw}, None)


def test_plan_split_never_puts_a_gpu_on_both_apis() -> None:
    infos = [gpu(i) for i in range(4)]
    plan = sharing.plan(infos, conf(dra_devices=("1", "GPU-3")))
    dra = {d.uuid for d in plan.dra_devices()}
    plugin = {d.uuid for d in plan.devices if not sharing.is_dra(d.resource)}
    assert dra == {"GPU-1", "GPU-3"}
    assert plugin == {"GPU-0", "GPU-2"}
    assert [r.name for r in plan.resources] == ["nvidia.com/gpu"]  # no plugin for DRA


def test_plan_split_is_off_until_dra_is_enabled() -> None:
    plan = sharing.plan([gpu(0)], cfg.build({"dra_devices": "all"}, None))
    assert plan.dra_devices() == ()


def test_plan_split_leaves_dra_gpus_out_of_sharing() -> None:
    text = (
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
        "      - {name: nvidia.com/gpu, replicas: 2}\ndra:\n  devices: ['1']\n"
    )
    file = cfg.load(Path("x"), lambda _: text)
    plan = sharing.plan([gpu(0), gpu(1)], cfg.build({"dra": True}, file))
    assert {d.id for d in plan.devices if not sharing.is_dra(d.resource)} == {
        "GPU-0::0", "GPU-0::1"
    }  # fmt: skip
    assert [(d.id, d.kind) for d in plan.dra_devices()] == [("GPU-1", Kind.GPU)]


def test_plan_split_gives_dra_the_mig_devices_of_a_mig_gpu() -> None:
    mig = gpu(0, mig_enabled=True, mig_devices=(MigInfo("MIG-a", "1g.10gb", 1, 0, 0),))
    plan = sharing.plan([mig, gpu(1)], conf(dra_devices="all", mig_strategy="mixed"))
    assert {(d.uuid, d.kind) for d in plan.dra_devices()} == {
        ("MIG-a", Kind.MIG), ("GPU-1", Kind.GPU)
    }  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("none", "none"), ("all", "all"), ("0, GPU-x,0", ("0", "GPU-x")), ([1, "2"], ("1", "2"))],
)
def test_dra_devices_values(raw: object, expected: object) -> None:
    assert parsers.PARSERS["dra_devices"](raw) == expected


@pytest.mark.parametrize("raw", ["", ",", [], [True], [{"a": 1}], 3])
def test_dra_devices_refuses_what_is_not_a_gpu_list(raw: object) -> None:
    with pytest.raises(ValueError, match="GPU"):
        parsers.PARSERS["dra_devices"](raw)


def test_dra_driver_name_must_be_a_dns_subdomain() -> None:
    with pytest.raises(ConfigError, match="--dra-driver-name: invalid value 'GPU_Driver'"):
        cfg.resolve(["--dra-driver-name", "GPU_Driver"], {})
    assert cfg.resolve([], {"AIODP_DRA_DRIVER_NAME": "gpu.example.com"}).dra_driver_name == (
        "gpu.example.com"
    )


def test_config_file_dra_key_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"dra.devices: invalid value"):
        cfg.build({}, cfg.load(Path("x"), lambda _: "version: v1\ndra:\n  devices: [{a: b}]\n"))
    assert cfg.load(Path("x"), lambda _: "version: v1\ndra:\n  gpus: all\n").unknown == (
        "dra.gpus",
    )


def test_long_dra_socket_paths_are_refused() -> None:
    with pytest.raises(ConfigError, match="--dra-plugins-dir"):
        cfg.build({"dra": True, "dra_plugins_dir": Path("/" + "x" * 100)}, None)


def devices(n: int, health: dict[int, str] | None = None) -> list[Device]:
    health = health or {}
    return [
        Device(
            resource=sharing.dra_resource(DRIVER),
            uuid=Uuid(f"GPU-{i}"),
            gpu=Uuid(f"GPU-{i}"),
            index=str(i),
            paths=(f"/dev/nvidia{i}",),
            numa_node=0,
            health=Health.UNHEALTHY if i in health else Health.HEALTHY,
            reason=health.get(i, ""),
        )
        for i in range(n)
    ]


def test_slices_hold_at_most_128_devices_and_share_the_generation() -> None:
    infos = {f"GPU-{i}": gpu(i) for i in range(300)}
    pool = slices.pool("node", DRIVER, devices(300), infos, topology.Topology())
    out = slices.bodies(pool, 7)
    assert [len(s["spec"]["devices"]) for s in out] == [128, 128, 44]
    assert {s["spec"]["pool"]["generation"] for s in out} == {7}
    assert {s["spec"]["pool"]["resourceSliceCount"] for s in out} == {3}
    assert len({s["metadata"]["name"] for s in out}) == 3


def test_an_empty_pool_is_one_slice_without_devices() -> None:
    (only,) = slices.bodies(slices.pool("node", DRIVER, [], {}, topology.Topology()), 1)
    assert only["spec"]["devices"] == []


def test_slice_device_attributes_and_taint() -> None:
    dev = devices(2, {1: "XID 79"})
    topo = topology.build(
        [("GPU-0", 0, 0), ("GPU-1", 1, 0)], nvlinks={frozenset({"GPU-0", "GPU-1"}): 4}
    )
    placed = gpu(0, pci_bus_id="00000000:18:00.0", pcie_root="pci0000:17")
    pool = slices.pool("node", DRIVER, dev, {"GPU-0": placed, "GPU-1": gpu(1)}, topo)
    first, second = pool.devices
    assert first["name"] == "gpu-0"
    assert first["attributes"]["cudaComputeCapability"] == {"version": "9.0.0"}
    assert first["attributes"]["nvlinkIsland"] == second["attributes"]["nvlinkIsland"] == {"int": 0}
    assert first["attributes"]["index"] == {"int": 0}
    assert first["attributes"]["resource.kubernetes.io/numaNode"] == {"int": 0}
    assert first["attributes"]["resource.kubernetes.io/pciBusID"] == {"string": "0000:18:00.0"}
    assert first["attributes"]["resource.kubernetes.io/pcieRoot"] == {"string": "pci0000:17"}
    assert first["attributes"]["numaNode"] == {"int": 0}  # deprecated, kept for a release
    assert "taints" not in first
    assert second["taints"] == [
        {"key": slices.TAINT_KEY, "value": "XID-79", "effect": "NoSchedule"}
    ]
    assert all(len(d["attributes"]) + len(d.get("capacity", {})) <= 32 for d in pool.devices)
    untainted = slices.pool("node", DRIVER, dev, {}, topo, taints=False)
    assert all("taints" not in d for d in untainted.devices)


def test_v1beta1_nests_device_data_under_basic() -> None:
    pool = slices.pool("node", DRIVER, devices(1), {"GPU-0": gpu(0)}, topology.Topology())
    (body,) = slices.bodies(pool, 1, "v1beta1")
    (dev,) = body["spec"]["devices"]
    assert set(dev) == {"name", "basic"}
    assert body["apiVersion"] == "resource.k8s.io/v1beta1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("580.95.05", "580.95.5"), ("9.0", "9.0.0"), ("13", "13.0.0"), ("", None), ("v1", None)],
)
def test_semver(text: str, expected: str | None) -> None:
    assert slices.semver(text) == expected


def prepare(claim: dict[str, Any], devs: list[Device] | None = None, **kw: Any) -> claims.Prepared:
    devs = devs if devs is not None else devices(4)
    return claims.prepare(
        claims.ClaimRef("ns", "c", "uid-1"), claim, driver=DRIVER, pool="node",
        devices={slices.device_name(d): d for d in devs}, inventory=Inventory.of(devs, 1),
        config=conf(**kw), control_paths=("/dev/nvidiactl",),
    )  # fmt: skip


def allocated(*names: str, pool: str = "node", config: list[Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"uid": "uid-1"},
        "status": {"allocation": {"devices": {
            "results": [
                {"request": "r", "driver": DRIVER, "pool": pool, "device": n} for n in names
            ],
            "config": config or [],
        }}},
    }  # fmt: skip


def test_prepare_answers_cdi_ids_and_a_spec_with_allocates_edits() -> None:
    done = prepare(allocated("gpu-1", "gpu-2"), gds_enabled=True)
    assert [d.cdi_id for d in done.devices] == [
        f"k8s.{DRIVER}/claim=uid-1-gpu-1", f"k8s.{DRIVER}/claim=uid-1-gpu-2"
    ]  # fmt: skip
    env = done.spec["containerEdits"]["env"]
    assert "NVIDIA_VISIBLE_DEVICES=GPU-1,GPU-2" in env
    assert "NVIDIA_GDS=enabled" in env
    assert done.spec["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidiactl", "hostPath": "/dev/nvidiactl"}
    ]
    assert done.spec["devices"][1]["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidia2", "hostPath": "/dev/nvidia2"}
    ]


def test_prepare_a_device_without_a_node_still_has_an_edit() -> None:
    """CDI refuses a device with no edits ("empty device edits"): one without a device node
    (a simulated node that has none) names itself in the environment instead."""
    bare = [dataclasses.replace(d, paths=()) for d in devices(4)]
    done = prepare(allocated("gpu-1"), bare)
    assert done.spec["devices"][0]["containerEdits"] == {"env": ["AIODP_DRA_DEVICE_GPU_1=GPU-1"]}
    assert "NVIDIA_VISIBLE_DEVICES=GPU-1" in done.spec["containerEdits"]["env"]


@pytest.mark.parametrize(
    ("claim", "message"),
    [
        ({"metadata": {"uid": "other"}}, "deleted and created again"),
        ({"metadata": {"uid": "uid-1"}}, "is not allocated"),
        (allocated(), "has no device of driver"),
        (allocated("gpu-1", pool="elsewhere"), "not in this node's pool"),
        (allocated("gpu-9"), "gpu-9"),
        (allocated("gpu-3"), "unhealthy since allocation: gpu-3 (GPU-3): XID 48"),
        (allocated("gpu-1", config=[{"opaque": {"driver": DRIVER, "parameters": 7}}]), "object"),
        (
            allocated(
                "gpu-1",
                config=[
                    {
                        "opaque": {
                            "driver": DRIVER,
                            "parameters": {
                                "apiVersion": "gpu.aiodp.io/v1alpha1",
                                "kind": "GpuConfig",
                                "sharing": {"strategy": "Spatial"},
                            },
                        }
                    }
                ],
            ),
            "must be TimeSlicing",
        ),
    ],
)
def test_prepare_errors_name_the_claim_or_device(claim: dict[str, Any], message: str) -> None:
    with pytest.raises(claims.ClaimError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(claim, devices(4, {3: "XID 48"}))


def test_prepare_ignores_other_drivers_config() -> None:
    other = [{"opaque": {"driver": "gpu.nvidia.com", "parameters": "anything"}}]
    assert prepare(allocated("gpu-0", config=other)).devices[0].device == "gpu-0"


@pytest.mark.parametrize(
    ("reason", "value"),
    [("XID 79 (fell off the bus)", "XID-79-fell-off-the-bus"), ("(((", "unhealthy"),
     ("x" * 80, "x" * 63), ("lost: NVML_ERROR_GPU_IS_LOST.", "lost-NVML_ERROR_GPU_IS_LOST")],
)  # fmt: skip
def test_taint_values_are_label_values(reason: str, value: str) -> None:
    assert slices.label_value(reason) == value


def test_a_mig_device_is_published_with_its_parent_profile_and_memory() -> None:
    mig = gpu(0, mig_enabled=True, mig_devices=(MigInfo("MIG-a", "1g.10gb", 1, 0, 0),))
    plan = sharing.plan([mig], conf(dra_devices="all", mig_strategy="mixed"))
    (dev,) = slices.pool(
        "node", DRIVER, plan.dra_devices(), {"GPU-0": mig}, topology.Topology()
    ).devices
    assert dev["name"] == "gpu-0-mig-0"
    assert dev["attributes"]["parentUUID"] == {"string": "GPU-0"}
    assert dev["attributes"]["profile"] == {"string": "1g.10gb"}
    assert dev["capacity"] == {"memory": {"value": "10240Mi"}}


def test_a_mig_device_carries_nvidias_capacities() -> None:
    info = MigInfo("MIG-a", "2g.20gb", 3, 0, 0, memory_mb=19968, multiprocessors=28,
                   gi_slices=2, ci_slices=2, engines=(2, 2, 0, 1, 0), placement=(2, 2))  # fmt: skip
    mig = gpu(0, mig_enabled=True, mig_devices=(info,))
    plan = sharing.plan([mig], conf(dra_devices="all", mig_strategy="mixed"))
    (dev,) = slices.pool(
        "node", DRIVER, plan.dra_devices(), {"GPU-0": mig}, topology.Topology()
    ).devices
    assert dev["capacity"] == {
        "multiprocessors": {"value": "28"},
        "copyEngines": {"value": "2"},
        "decoders": {"value": "2"},
        "encoders": {"value": "0"},
        "jpegEngines": {"value": "1"},
        "ofaEngines": {"value": "0"},
        "memorySlice2": {"value": "1"},  # NVIDIA's: the memory slices its instance holds
        "memorySlice3": {"value": "1"},
        "memory": {"value": "19968Mi"},  # NVML's MIG memory, not the profile's 20 GiB
    }


def test_prepare_a_time_slice_interval_is_asked_per_gpu() -> None:
    """NVIDIA's GpuConfig TimeSlicing intervals: Short 1, Medium 2, Long 3, by request; a GPU
    at Default is not listed (nothing to set)."""
    sliced = {"opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig",
        "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}},
    }}}  # fmt: skip
    got = prepare(allocated("gpu-1", "gpu-2", config=[sliced]))
    assert got.time_slices == {"GPU-1": 3, "GPU-2": 3}
    only = prepare(allocated("gpu-1", config=[{**sliced, "requests": ["other"]}]))
    assert only.time_slices == {}
    assert prepare(allocated("gpu-1")).time_slices == {}
