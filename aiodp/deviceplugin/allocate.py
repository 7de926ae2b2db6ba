"""What Allocate answers for one container request: the container edits as the kubelet's
ContainerAllocateResponse."""

from __future__ import annotations

from collections.abc import Sequence

from aiodp.config.model import Config
from aiodp.gen.deviceplugin.v1beta1 import CdiDevice, ContainerAllocateResponse, DeviceSpec, Mount
from aiodp.gpus import edits
from aiodp.gpus.devices import Inventory, Resource


def to_response(e: edits.ContainerEdits) -> ContainerAllocateResponse:
    """The edits as the kubelet's message (same fields, same order)."""
    return ContainerAllocateResponse(
        envs=dict(e.envs),
        mounts=[Mount(container_path=m.container_path, host_path=m.host_path) for m in e.mounts],
        devices=[
            DeviceSpec(
                container_path=d.container_path, host_path=d.host_path, permissions=d.permissions
            )
            for d in e.devices
        ],
        annotations=dict(e.annotations),
        cdi_devices=[CdiDevice(name=n) for n in e.cdi_devices],
    )


def build_response(
    ids: Sequence[str],
    inventory: Inventory,
    resource: Resource,
    config: Config,
    control_paths: Sequence[str] = (),
    imex_channels: Sequence[int] = (),
) -> ContainerAllocateResponse:
    """The answer for one container request (`edits.build`); the same request gives the same
    answer."""
    return to_response(edits.build(ids, inventory, resource, config, control_paths, imex_channels))
