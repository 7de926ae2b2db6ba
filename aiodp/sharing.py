"""Which devices each resource advertises, given the GPUs a backend discovered."""

from __future__ import annotations

from collections.abc import Iterable

from aiodp.backend import DeviceInfo
from aiodp.config import RESOURCE_GPU
from aiodp.devices import Device, DeviceId


def advertised(infos: Iterable[DeviceInfo], resource: str = RESOURCE_GPU) -> list[Device]:
    """One device per whole GPU under `resource`, carrying the GPU's known health."""
    return [
        Device(
            id=DeviceId(g.uuid),
            resource=resource,
            uuid=g.uuid,
            gpu=g.uuid,
            index=str(g.index),
            paths=g.paths,
            numa_node=g.numa_node,
            health=g.health,
            reason=g.reason,
        )
        for g in infos
    ]
