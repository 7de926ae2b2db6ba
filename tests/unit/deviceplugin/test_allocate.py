"""Allocate answers per option, modelled on what NVIDIA's plugin puts in its responses."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from aiodp.config.model import Config
from aiodp.deviceplugin import allocate
from aiodp.gen.deviceplugin.v1beta1 import CdiDevice, ContainerAllocateResponse, DeviceSpec, Mount
from aiodp.gpus import edits
from aiodp.gpus.devices import Health, Inventory, Resource
from aiodp.kit.errors import UnhealthyDevice, UnknownDevice
from tests.builders import gpu

RES = "nvidia.com/gpu"
CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm")


def inventory() -> Inventory:
    devs = [gpu(i, numa_node=0) for i in range(4)]
    devs[3] = dataclasses.replace(devs[3], health=Health.UNHEALTHY, reason="XID 79")
    devs.append(gpu(9, uuid="OTHER-0", resource="example.com/other", paths=()))
    return Inventory.of(devs, 1)


def answer(ids: list[str], **options: Any) -> ContainerAllocateResponse:
    config = dataclasses.replace(Config(), **options)
    return allocate.build_response(ids, inventory(), Resource(RES), config, CONTROL)


def test_allocate_envvar_uuid_default() -> None:
    r = answer(["GPU-1", "GPU-0"])
    assert r.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-1,GPU-0"}
    assert r.mounts == []
    assert r.devices == []
    assert r.annotations == {}
    assert r.cdi_devices == []


def test_allocate_index_strategy() -> None:
    assert answer(["GPU-2", "GPU-0"], device_id_strategy="index").envs == {
        "NVIDIA_VISIBLE_DEVICES": "2,0"
    }


def test_allocate_repeated_ids_count_once() -> None:
    assert answer(["GPU-1", "GPU-1", "GPU-0"]).envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-1,GPU-0"


def test_allocate_volume_mounts() -> None:
    r = answer(["GPU-0", "GPU-1"], device_list_strategy=("volume-mounts",))
    assert r.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert r.mounts == [
        Mount(container_path="/var/run/nvidia-container-devices/GPU-0", host_path="/dev/null"),
        Mount(container_path="/var/run/nvidia-container-devices/GPU-1", host_path="/dev/null"),
    ]


@pytest.mark.parametrize(
    "strategies", [("cdi-annotations",), ("cdi-cri",), ("cdi-annotations", "cdi-cri")]
)
def test_allocate_cdi_only_adds_nothing_else(strategies: tuple[str, ...]) -> None:
    r = answer(["GPU-0", "GPU-2"], device_list_strategy=strategies, pass_device_specs=True)
    names = ["nvidia.com/gpu=GPU-0", "nvidia.com/gpu=GPU-2"]
    if "cdi-annotations" in strategies:
        ((key, value),) = r.annotations.items()
        assert re.fullmatch(r"cdi\.k8s\.io/nvidia-device-plugin_[0-9a-f-]{36}", key)
        assert value == ",".join(names)
    else:
        assert r.annotations == {}
    if "cdi-cri" in strategies:
        assert r.cdi_devices == [CdiDevice(name=n) for n in names]
    else:
        assert r.cdi_devices == []
    assert r.envs == {}
    assert r.mounts == []
    assert r.devices == []


def test_allocate_cdi_with_envvar_and_custom_names() -> None:
    r = answer(
        ["GPU-1"],
        device_list_strategy=("envvar", "cdi-annotations"),
        cdi_annotation_prefix="cdi.example.org/",
        cdi_kind="example.com/gpu",
        device_id_strategy="index",
    )
    key = edits.cdi_annotation_key("cdi.example.org/", RES, ["1"])
    assert key.startswith("cdi.example.org/nvidia-device-plugin_")
    assert r.annotations == {key: "example.com/gpu=1"}
    other = answer(["GPU-2"], device_list_strategy=("cdi-annotations",))
    assert set(other.annotations) != {key}  # another request, another key
    assert r.envs == {"NVIDIA_VISIBLE_DEVICES": "1"}


def test_allocate_device_specs_under_dev_root() -> None:
    r = answer(["GPU-2", "GPU-0"], pass_device_specs=True, nvidia_dev_root=Path("/host/"))
    assert r.devices == [
        DeviceSpec(container_path=p, host_path="/host" + p, permissions="rw")
        for p in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia2", "/dev/nvidia0")
    ]


def test_allocate_is_idempotent() -> None:
    assert bytes(answer(["GPU-0", "GPU-1"], pass_device_specs=True)) == bytes(
        answer(["GPU-0", "GPU-1"], pass_device_specs=True)
    )


def test_allocate_unknown_ids_are_named() -> None:
    with pytest.raises(UnknownDevice) as err:
        answer(["GPU-0", "GPU-9", "OTHER-0"])  # OTHER-0 belongs to another resource
    assert err.value.ids == ("GPU-9", "OTHER-0")
    assert str(err.value) == "unknown device id(s): GPU-9, OTHER-0"


def test_allocate_unhealthy_is_refused_with_reason() -> None:
    with pytest.raises(UnhealthyDevice) as err:
        answer(["GPU-0", "GPU-3"])
    assert err.value.ids == ("GPU-3",)
    assert "XID 79" in str(err.value)


def test_allocate_unknown_wins_over_unhealthy() -> None:
    with pytest.raises(UnknownDevice):
        answer(["GPU-3", "nope"])


def test_allocate_gdrcopy_gds_mofed_as_nvidia() -> None:
    """NVIDIA sets these before it stops for CDI-only strategies: they are always there."""
    for strategies in (("envvar",), ("cdi-cri",)):
        r = answer(
            ["GPU-0"], gdrcopy_enabled=True, mofed_enabled=True, device_list_strategy=strategies
        )
        assert r.envs["NVIDIA_GDRCOPY"] == "enabled"
        assert r.envs["NVIDIA_MOFED"] == "enabled"
        assert "NVIDIA_GDS" not in r.envs


def test_allocate_imex_channels_in_every_strategy() -> None:
    def with_imex(**options: Any) -> ContainerAllocateResponse:
        config = dataclasses.replace(Config(), imex_channel_ids=(0,), **options)
        return allocate.build_response(["GPU-1"], inventory(), Resource(RES), config, CONTROL, (0,))

    env = with_imex(pass_device_specs=True)
    assert env.envs["NVIDIA_IMEX_CHANNELS"] == "0"
    assert env.devices[-1] == DeviceSpec(
        container_path="/dev/nvidia-caps-imex-channels/channel0",
        host_path="/dev/nvidia-caps-imex-channels/channel0",
        permissions="rw",
    )
    mounts = with_imex(device_list_strategy=("volume-mounts",))
    assert (
        Mount(container_path="/var/run/nvidia-container-devices/imex/0", host_path="/dev/null")
        in mounts.mounts
    )
    cdi = with_imex(device_list_strategy=("cdi-cri",))
    assert [d.name for d in cdi.cdi_devices] == [
        "nvidia.com/gpu=GPU-1",
        "nvidia.com/imex-channel=0",
    ]
    assert "NVIDIA_IMEX_CHANNELS" not in answer(["GPU-1"]).envs  # none configured or present
