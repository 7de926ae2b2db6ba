"""Keyword builders for the device model, shared by every test that needs devices by hand."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from aiodp.config.model import Config
from aiodp.gen.deviceplugin import v1beta1 as api
from aiodp.gpus import topology
from aiodp.gpus.devices import Device, DeviceRegistry, Health, Kind, Resource, Uuid

RES = "nvidia.com/gpu"


def gpu(
    i: int,
    *,
    uuid: str | None = None,
    resource: str = RES,
    paths: tuple[str, ...] | None = None,
    numa_node: int | None = None,
    health: Health = Health.HEALTHY,
    reason: str = "",
    memory_mib: int = 0,
) -> Device:
    """Whole GPU `i`: UUID `GPU-<i>` unless given, index `i`, node `/dev/nvidia<i>`."""
    u = Uuid(uuid or f"GPU-{i}")
    return Device(
        resource=resource,
        uuid=u,
        gpu=u,
        index=str(i),
        kind=Kind.GPU,
        paths=(f"/dev/nvidia{i}",) if paths is None else paths,
        numa_node=numa_node,
        health=health,
        reason=reason,
        memory_mib=memory_mib,
    )


def mig(uuid: str, parent: str, index: str, *, resource: str = "nvidia.com/mig-1g.10gb") -> Device:
    """MIG device `uuid` on GPU `parent`, NVIDIA's index `<gpu>:<n>`."""
    return Device(resource=resource, uuid=Uuid(uuid), gpu=Uuid(parent), index=index, kind=Kind.MIG)


def replica(
    i: int, n: int, *, resource: str = "nvidia.com/gpu.shared", numa_node: int | None = None
) -> Device:
    """Replica `n` of whole GPU `i` (ID `GPU-<i>::<n>`)."""
    return gpu(i, resource=resource, paths=(), numa_node=numa_node).replicated(n, resource)


def set_health(
    registry: DeviceRegistry, uuids: Iterable[str], health: Health, reason: str = ""
) -> tuple[tuple[Device, Device], ...]:
    """Give the named GPUs or MIG devices one verdict (fanned out by the registry)."""
    return registry.apply_health({Uuid(u): (health, reason) for u in uuids})


def to_api(devices: Sequence[Device]) -> api.ListAndWatchResponse:
    """The generated message for a device list: the reference `server.snapshot` must match."""
    return api.ListAndWatchResponse(
        devices=[
            api.Device(
                id=d.id,
                health=d.health.value,
                topology=None
                if d.numa_node is None
                else api.TopologyInfo(nodes=[api.NumaNode(id=d.numa_node)]),
            )
            for d in devices
        ]
    )


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Live settings that never change, for a service under test (the plugin reads
    reload.Live); calls use the service's own resource definition."""

    config: Config = dataclasses.field(default_factory=Config)
    topo: topology.Topology = dataclasses.field(default_factory=topology.Topology)
    control_paths: tuple[str, ...] = ()
    imex_channels: tuple[int, ...] = ()

    def resource(self, name: str) -> Resource | None:
        return None
