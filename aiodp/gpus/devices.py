"""What devices this node advertises, how healthy each is, and who waits for a change."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NewType

DeviceId = NewType("DeviceId", str)
"""An ID the kubelet sees: a GPU's or MIG device's UUID, or `<uuid>::<n>` for a replica."""
Uuid = NewType("Uuid", str)
"""A GPU's or MIG device's UUID, as NVML names it: what health is tracked by."""


class Health(enum.Enum):
    """The two health strings the kubelet knows; anything but "Healthy" is unhealthy."""

    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class Kind(enum.Enum):
    """What an advertised ID stands for."""

    GPU = "gpu"
    """A whole GPU: its ID is its UUID."""
    MIG = "mig"
    """A MIG device: its ID is its MIG UUID."""
    REPLICA = "replica"
    """A shared (time-sliced or MPS) replica of a GPU or MIG device: `<uuid>::<n>`."""


def imex_channel_path(channel: int) -> str:
    """The container path of an IMEX channel's device node, as NVIDIA's plugin hands it."""
    return f"/dev/nvidia-caps-imex-channels/channel{channel}"


def device_id(uuid: Uuid, replica: int | None = None) -> DeviceId:
    """The ID the kubelet sees: the UUID itself, or `<uuid>::<n>` for replica n."""
    return DeviceId(uuid if replica is None else f"{uuid}::{replica}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """One advertised device: a whole GPU, a MIG device, or a replica of either.

    Its `id` is derived from its kind: a GPU or MIG device is advertised by its UUID, a
    replica by `<uuid>::<n>`.
    """

    resource: str
    """Extended resource name, e.g. `nvidia.com/gpu`."""
    uuid: Uuid
    """UUID of the GPU or MIG device this ID stands for (replicas share it)."""
    gpu: Uuid
    """UUID of the physical GPU (the parent of a MIG device): health fans out by it."""
    index: str
    """NVIDIA's index: `3` for a GPU, `3:1` for a MIG device."""
    kind: Kind = Kind.GPU
    replica: int | None = None
    """n of a `<uuid>::<n>` replica; None for a whole GPU or MIG device."""
    paths: tuple[str, ...] = ()
    """Device nodes this device needs, container paths such as `/dev/nvidia3`."""
    numa_node: int | None = None
    """NUMA node of the GPU, None when unknown (no TopologyInfo is sent)."""
    health: Health = Health.HEALTHY
    reason: str = ""
    """Why the device is Unhealthy; empty while Healthy."""
    memory_mib: int = 0
    id: DeviceId = field(init=False)
    """The ID the kubelet sees, derived from `uuid` and `replica`."""

    def __post_init__(self) -> None:
        if (self.kind is Kind.REPLICA) != (self.replica is not None):
            raise ValueError(
                f"device {self.uuid}: kind {self.kind.value} with replica {self.replica}"
            )
        if self.kind is Kind.GPU and self.uuid != self.gpu:
            raise ValueError(f"device {self.uuid}: a whole GPU is its own GPU, not {self.gpu}")
        object.__setattr__(self, "id", device_id(self.uuid, self.replica))

    @property
    def on_mig(self) -> bool:
        """A MIG device, or a replica of one."""
        return self.uuid != self.gpu

    def replicated(self, n: int, resource: str) -> Device:
        """Replica n of this GPU or MIG device, advertised as `resource`."""
        return dataclasses.replace(self, kind=Kind.REPLICA, replica=n, resource=resource)


@dataclass(frozen=True, slots=True)
class Resource:
    """One advertised resource: its name and how its devices are shared."""

    name: str
    kind: Literal["gpu", "mig"] = "gpu"
    sharing: Literal["none", "time-slicing", "mps"] = "none"
    replicas: int = 1
    fail_requests_greater_than_one: bool = False


@dataclass(frozen=True, slots=True)
class Inventory:
    """An immutable, sorted snapshot of devices with a version that grows on every change."""

    devices: tuple[Device, ...] = ()
    version: int = 0
    _by_id: Mapping[DeviceId, Device] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, devices: Iterable[Device], version: int) -> Inventory:
        ordered = tuple(sorted(devices, key=_sort_key))
        return cls(ordered, version, {d.id: d for d in ordered})

    def get(self, device_id: str) -> Device | None:
        return self._by_id.get(DeviceId(device_id))

    def for_resource(self, resource: str) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.resource == resource)


def _sort_key(d: Device) -> tuple[str, tuple[int, ...], str]:
    return (d.resource, tuple(int(p) for p in d.index.split(":") if p.isdigit()), d.id)


class DeviceRegistry:
    """The one place device state lives; RPC handlers read it, health and discovery write it.

    `watch()` hands every reader the current state at once and then the latest state after
    each change: a slow reader skips versions, and unchanged state wakes nobody.
    """

    def __init__(self, devices: Iterable[Device] = (), clock: Callable[[], float] = time.time):
        self._inventory = Inventory.of(devices, 0)
        self._changed = asyncio.Event()
        self._clock = clock
        self._since: dict[DeviceId, float] = {d.id: clock() for d in self._inventory.devices}

    def inventory(self) -> Inventory:
        return self._inventory

    def since(self, device_id: DeviceId) -> float | None:
        """When the device last changed health (or appeared), wall-clock seconds."""
        return self._since.get(device_id)

    def get(self, device_id: str) -> Device | None:
        return self._inventory.get(device_id)

    def replace(self, devices: Iterable[Device]) -> bool:
        """Install a newly discovered device set; returns whether anything changed."""
        new = tuple(sorted(devices, key=_sort_key))
        if new == self._inventory.devices:
            return False
        self._publish(new)
        return True

    def apply_health(
        self, states: Mapping[Uuid, tuple[Health, str]]
    ) -> tuple[tuple[Device, Device], ...]:
        """Apply health verdicts keyed by GPU or MIG UUID, in one version bump.

        The fan-out lives here: a verdict on a GPU covers its replicas and every MIG device
        on it (unless that MIG device has a verdict of its own), one on a MIG device that
        device and its replicas. Returns the (old, new) pairs that changed; an empty tuple
        wakes nobody.
        """
        changes: list[tuple[Device, Device]] = []
        devices = []
        for dev in self._inventory.devices:
            verdict = states.get(dev.uuid) or states.get(dev.gpu)
            if verdict is None:
                devices.append(dev)
                continue
            health, reason = verdict
            reason = "" if health is Health.HEALTHY else reason
            if dev.health is health and dev.reason == reason:
                devices.append(dev)
                continue
            new = dataclasses.replace(dev, health=health, reason=reason)
            changes.append((dev, new))
            devices.append(new)
        if changes:
            self._publish(tuple(devices))
        return tuple(changes)

    def wake(self) -> None:
        """Wake every watcher without a change, so that it re-checks its `until` event."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _publish(self, devices: tuple[Device, ...]) -> None:
        old = {d.id: d.health for d in self._inventory.devices}
        now = self._clock()
        self._since = {
            d.id: now if old.get(d.id) is not d.health else self._since.get(d.id, now)
            for d in devices
        }
        self._inventory = Inventory.of(devices, self._inventory.version + 1)
        self.wake()

    async def changed(self) -> None:
        """Return at the next change of any device."""
        await self._changed.wait()

    async def watch(
        self, resource: str, *, until: asyncio.Event | None = None
    ) -> AsyncGenerator[tuple[Device, ...], None]:
        """The resource's devices now, then again after each change to them.

        Ends when `until` is set and `wake()` has been called.
        """
        last: tuple[Device, ...] | None = None
        while until is None or not until.is_set():
            changed = self._changed
            current = self._inventory.for_resource(resource)
            if current != last:
                last = current
                yield current
                continue
            await changed.wait()
