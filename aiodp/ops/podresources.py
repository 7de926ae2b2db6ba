"""Which pod holds which GPU: the kubelet's pod-resources API (`/v1.PodResourcesLister/List`).

Read on the device-metrics interval and soon after every Allocate we answer. `Attribution`
keeps the latest answer as physical GPU UUID -> holders; the GPU metrics and `/status` read
it. When the socket is absent (not mounted, an old kubelet) or the call fails, holders are
empty, one line says why, and nothing else changes: attribution is an extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import ProtocolError, StreamTerminatedError

from aiodp.gen.podresources.v1 import ListPodResourcesResponse, PodResourcesListerStub
from aiodp.kit import aio
from aiodp.kit.errors import cut_text

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
"""The kubelet's own client default for this API; a larger answer is refused, not decoded."""
MAX_HOLDERS: Final = 4096
"""(container, device) pairs kept per answer: bounds the label sets on /metrics."""
MAX_LABELLED_HOLDERS: Final = 8
"""A GPU held by more containers (time-slicing, MPS) has its counters reported once, without
pod labels, rather than copied per container: scrape size stays bounded by the GPUs."""
MAX_CLAIM_RESOURCES: Final = 16384
"""Claimed devices (`dynamic_resources`) looked at per answer, ours or not: a hostile or
broken peer listing 10,000s costs a bounded walk."""
CALL_TIMEOUT: Final = 5.0
ALLOCATE_DELAY: Final = 1.0
"""After an Allocate, wait this long before asking: the kubelet lists a container only once
the runtime has created it."""


@dataclass(frozen=True, slots=True)
class Holder:
    """One container holding one of our devices."""

    namespace: str
    pod: str
    container: str
    resource: str
    device: str
    """The device ID as allocated (a UUID, `<uuid>::<n>`, a MIG UUID or an index), or the
    DRA device name (`gpu-3`)."""
    claim_namespace: str = ""
    claim_name: str = ""
    """The ResourceClaim a DRA-served device was allocated through; empty otherwise."""


Holders = Mapping[str, tuple[Holder, ...]]
"""GPU or MIG device UUID -> the containers holding it (or one of its replicas)."""


class _BoundedCodec(ProtoCodec):
    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > MAX_RESPONSE_BYTES:
            raise ValueError(f"pod-resources answer of {len(data)} bytes is over the bound")
        return super().decode(data, message_type)


def holders(
    answer: ListPodResourcesResponse,
    physical: Callable[[str, str], str | None],
    claimed: Callable[[str, str, str], str | None] = lambda *_: None,
) -> dict[str, tuple[Holder, ...]]:
    """Map the kubelet's answer to our devices; `physical(resource, device_id)` names the GPU
    or MIG device UUID behind an ID of ours (a replica's too), `claimed(driver, pool,
    device)` the one behind a DRA device of ours (`dynamic_resources`, v1 since 1.34), or
    None for one that is not ours (another plugin's or driver's, a gone one)."""
    out: dict[str, list[Holder]] = {}
    kept = 0
    seen = 0
    for pod in answer.pod_resources:
        for container in pod.containers:
            for dynamic in container.dynamic_resources:
                for res in dynamic.claim_resources:
                    seen += 1
                    if seen > MAX_CLAIM_RESOURCES:
                        log.warning("pod-resources: over %d claimed devices in one answer; "
                                    "the rest are left out", MAX_CLAIM_RESOURCES)  # fmt: skip
                        return _frozen(out)
                    gpu = claimed(res.driver_name, res.pool_name, res.device_name)
                    if gpu is None:
                        continue
                    if kept == MAX_HOLDERS:
                        return _frozen(out)
                    kept += 1
                    out.setdefault(gpu, []).append(
                        Holder(
                            pod.namespace[:63], pod.name[:253], container.name[:63],
                            f"dra:{res.driver_name[:253]}", res.device_name[:63],
                            dynamic.claim_namespace[:63], dynamic.claim_name[:253],
                        )
                    )  # fmt: skip
            for devices in container.devices:
                for device_id in devices.device_ids:
                    gpu = physical(devices.resource_name, device_id)
                    if gpu is None:
                        continue
                    if kept == MAX_HOLDERS:
                        log.warning(
                            "pod-resources: over %d (container, device) pairs; the rest are "
                            "left out of the pod labels",
                            MAX_HOLDERS,
                        )
                        return _frozen(out)
                    kept += 1
                    out.setdefault(gpu, []).append(
                        Holder(  # Kubernetes' own bounds: longer is not a name, cut it
                            pod.namespace[:63],
                            pod.name[:253],
                            container.name[:63],
                            devices.resource_name[:253],
                            device_id[:253],
                        )
                    )
    return _frozen(out)


def _frozen(out: dict[str, list[Holder]]) -> dict[str, tuple[Holder, ...]]:
    return {gpu: tuple(sorted(set(hs), key=_key)) for gpu, hs in out.items()}


def _key(h: Holder) -> tuple[str, ...]:
    return (h.namespace, h.pod, h.container, h.device, h.claim_namespace, h.claim_name)


async def list_once(socket: Path) -> ListPodResourcesResponse:
    """One List call on the kubelet's pod-resources socket, bounded by CALL_TIMEOUT."""
    channel = Channel(path=str(socket), codec=_BoundedCodec())
    try:
        return await PodResourcesListerStub(channel).list(timeout=CALL_TIMEOUT)
    finally:
        channel.close()


class Attribution:
    """The latest pod-resources answer, and the task that keeps it fresh."""

    def __init__(
        self,
        socket: Path,
        physical: Callable[[str, str], str | None],
        claimed: Callable[[str, str, str], str | None] = lambda *_: None,
    ) -> None:
        self.socket = socket
        self.physical = physical
        self.claimed = claimed
        self.holders: Holders = {}
        self.trouble = aio.Trouble(log)
        """Why holders are empty, while the socket cannot be read."""
        self.allocated = asyncio.Event()

    def on_allocate(self) -> None:
        """An Allocate was answered: ask again soon."""
        self.allocated.set()

    async def refresh(self) -> None:
        try:
            answer = await list_once(self.socket)
        except (
            OSError,
            GRPCError,
            TimeoutError,
            ProtocolError,
            StreamTerminatedError,
            ValueError,
        ) as e:
            self._failed(e)
            return
        self.trouble.cleared("pod-resources: %s answers again; pods label the GPU metrics",
                             self.socket)  # fmt: skip
        self.holders = holders(answer, self.physical, self.claimed)

    @property
    def problem(self) -> str | None:
        """Why holders are empty, while the socket cannot be read; None once it answers."""
        return self.trouble.why

    def _failed(self, e: BaseException) -> None:
        if isinstance(e, FileNotFoundError):
            why = "the socket is absent (not mounted, or a kubelet without the API)"
        elif isinstance(e, GRPCError):
            why = f"{e.status.name} {cut_text(e.message or '', 200)}"
        else:
            why = cut_text(f"{type(e).__name__}: {e}", 200)
        self.holders = {}
        self.trouble.failing(
            why,
            # absent: a setting, not a fault (info); the rest: warning
            logging.INFO if isinstance(e, FileNotFoundError) else logging.WARNING,
            "pod-resources: cannot read %s: %s; the pod, namespace and container labels "
            "stay empty, everything else works",
            self.socket,
            why,
        )

    async def run(self, *, interval: float) -> NoReturn:
        """Ask every `interval` seconds, and `ALLOCATE_DELAY` after an Allocate."""
        while True:
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.allocated.wait()
                    await asyncio.sleep(ALLOCATE_DELAY)
            self.allocated.clear()
