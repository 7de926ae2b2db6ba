"""A stand-in for the kubelet's pod-resources socket, for tests and the demo.

`FakePodResources(path)` serves `/v1.PodResourcesLister/List` from the same generated
messages the plugin reads; `assign()` and `release()` change the answer while it runs, as
pods start and end. `calls` counts List calls; `answered()` waits until an answer given after
now has been read (the caller asked again after it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import grpclib.server
from grpclib import GRPCError
from grpclib.const import Status

from aiodp.gen.podresources.v1 import (
    AllocatableResourcesRequest,
    AllocatableResourcesResponse,
    ClaimResource,
    ContainerDevices,
    ContainerResources,
    DynamicResource,
    ListPodResourcesRequest,
    ListPodResourcesResponse,
    PodResources,
    PodResourcesListerBase,
)


class FakePodResources(PodResourcesListerBase):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.pods: dict[tuple[str, str], dict[str, list[ContainerDevices]]] = {}
        """(namespace, pod) -> container -> devices"""
        self.claims: dict[tuple[str, str], dict[str, list[DynamicResource]]] = {}
        """(namespace, pod) -> container -> DRA claims (dynamic_resources)"""
        self.calls = 0
        self._called = asyncio.Condition()
        self.refuse: Status | None = None
        """When set, List answers this status (a kubelet that refuses us)."""
        self._server: grpclib.server.Server | None = None

    async def __aenter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = grpclib.server.Server([self])
        await self._server.start(path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def assign(
        self, namespace: str, pod: str, container: str, resource: str, ids: Sequence[str]
    ) -> None:
        """A container of a pod now holds these device IDs of `resource`."""
        containers = self.pods.setdefault((namespace, pod), {})
        containers.setdefault(container, []).append(
            ContainerDevices(resource_name=resource, device_ids=list(ids))
        )

    def claim(
        self, namespace: str, pod: str, container: str, claim: str, driver: str, pool: str,
        devices: Sequence[str],
    ) -> None:  # fmt: skip
        """A container of a pod holds these DRA devices through its claim `claim`."""
        self.pods.setdefault((namespace, pod), {}).setdefault(container, [])
        self.claims.setdefault((namespace, pod), {}).setdefault(container, []).append(
            DynamicResource(
                claim_name=claim, claim_namespace=namespace,
                claim_resources=[
                    ClaimResource(driver_name=driver, pool_name=pool, device_name=d)
                    for d in devices
                ],
            )
        )  # fmt: skip

    def release(self, namespace: str, pod: str) -> None:
        """The pod ended."""
        self.pods.pop((namespace, pod), None)
        self.claims.pop((namespace, pod), None)

    async def answered(self) -> None:
        """Return once the reader took an answer built after this call: two more List calls
        (one reader asks one at a time, so the first has been applied when the second comes)."""
        target = self.calls + 2
        async with self._called:
            await self._called.wait_for(lambda: self.calls >= target)

    async def list(self, message: ListPodResourcesRequest) -> ListPodResourcesResponse:
        self.calls += 1
        async with self._called:
            self._called.notify_all()
        if self.refuse is not None:
            raise GRPCError(self.refuse, "refused by the fake")
        return ListPodResourcesResponse(
            pod_resources=[
                PodResources(
                    name=pod,
                    namespace=namespace,
                    containers=[
                        ContainerResources(
                            name=name,
                            devices=list(devices),
                            dynamic_resources=self.claims.get((namespace, pod), {}).get(name, []),
                        )
                        for name, devices in containers.items()
                    ],
                )
                for (namespace, pod), containers in self.pods.items()
            ]
        )

    async def get_allocatable_resources(
        self, message: AllocatableResourcesRequest
    ) -> AllocatableResourcesResponse:
        return AllocatableResourcesResponse()
