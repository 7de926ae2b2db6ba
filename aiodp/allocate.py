"""What a container receives for the devices the kubelet chose: one ContainerAllocateResponse.

Mirrors NVIDIA's plugin per device-list strategy: CDI names first (annotations and/or the
`cdi_devices` field); when only CDI strategies are on, nothing else. Otherwise
`NVIDIA_VISIBLE_DEVICES` as a list (`envvar`) or as a directory of `/dev/null` mounts
(`volume-mounts`), and, with `pass_device_specs`, the device nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from aiodp.api.v1beta1 import CdiDevice, ContainerAllocateResponse, DeviceSpec, Mount
from aiodp.config import Config
from aiodp.devices import Device, Health, Inventory
from aiodp.errors import UnhealthyDevice, UnknownDevice

VISIBLE_DEVICES: Final = "NVIDIA_VISIBLE_DEVICES"
VOLUME_MOUNT_DIR: Final = "/var/run/nvidia-container-devices"
CDI_STRATEGIES: Final = frozenset({"cdi-annotations", "cdi-cri"})


def resolve_ids(ids: Sequence[str], inventory: Inventory, resource: str) -> list[Device]:
    """The requested devices, de-duplicated in order; unknown or Unhealthy ones raise."""
    wanted = list(dict.fromkeys(ids))
    found = {i: inventory.get(i) for i in wanted}
    unknown = [i for i, d in found.items() if d is None or d.resource != resource]
    if unknown:
        raise UnknownDevice(unknown)
    devices = [d for d in found.values() if d is not None]
    sick = [d for d in devices if d.health is not Health.HEALTHY]
    if sick:
        raise UnhealthyDevice([d.id for d in sick], [f"{d.id}: {d.reason}" for d in sick])
    return devices


def visible_ids(devices: Sequence[Device], config: Config) -> list[str]:
    """The IDs the runtime sees: unique GPU/MIG UUIDs (replicas collapse), or indexes."""
    out = [d.index if config.device_id_strategy == "index" else d.uuid for d in devices]
    return list(dict.fromkeys(out))


def build_response(
    ids: Sequence[str],
    inventory: Inventory,
    resource: str,
    config: Config,
    control_paths: Sequence[str] = (),
) -> ContainerAllocateResponse:
    """The answer for one container request; the same request gives the same answer."""
    devices = resolve_ids(ids, inventory, resource)
    visible = visible_ids(devices, config)
    strategies = config.device_list_strategy
    resp = ContainerAllocateResponse()
    cdi_names = [f"{config.cdi_kind}={v}" for v in visible]
    if "cdi-annotations" in strategies:
        key = f"{config.cdi_annotation_prefix}aiodp-{resource.replace('/', '_')}"
        resp.annotations[key] = ",".join(cdi_names)
    if "cdi-cri" in strategies:
        resp.cdi_devices = [CdiDevice(name=n) for n in cdi_names]
    if set(strategies) <= CDI_STRATEGIES:
        return resp
    if "envvar" in strategies:
        resp.envs[VISIBLE_DEVICES] = ",".join(visible)
    if "volume-mounts" in strategies:
        resp.envs[VISIBLE_DEVICES] = VOLUME_MOUNT_DIR
        resp.mounts = [
            Mount(container_path=f"{VOLUME_MOUNT_DIR}/{v}", host_path="/dev/null") for v in visible
        ]
    if config.pass_device_specs:
        paths = list(control_paths)
        for d in devices:
            paths.extend(d.paths)
        root = str(config.dev_root).rstrip("/")
        resp.devices = [
            DeviceSpec(container_path=p, host_path=root + p, permissions="rw")
            for p in dict.fromkeys(paths)
        ]
    return resp
