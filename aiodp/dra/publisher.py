"""What the API server knows of this node's DRA devices: our ResourceSlices, kept equal to the
pool, and the ResourceClaims we read to prepare.

The slices are re-published whenever the pool changes (discovery, health, a config reload:
each bumps the pool's generation) and re-created when someone deletes them: the kubelet
deletes all of a node's slices when it starts, and a driver's 30 s after it stops answering.
`resource.k8s.io/v1` is used where the server serves it, else v1beta2, else v1beta1. An API
server that is down or refuses is a retry with backoff: the node plugin keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final, NoReturn

from lightkube import ApiError, AsyncClient
from lightkube.generic_resource import create_global_resource, create_namespaced_resource

from aiodp.dra import slices
from aiodp.dra.claims import ClaimRef
from aiodp.kit import aio, retry
from aiodp.kit.errors import cut_text

log = logging.getLogger(__name__)

GROUP: Final = "resource.k8s.io"


def _slice_kind(version: str) -> Any:
    return create_global_resource(GROUP, version, "ResourceSlice", "resourceslices")


def _claim_kind(version: str) -> Any:
    return create_namespaced_resource(GROUP, version, "ResourceClaim", "resourceclaims")


async def served_version(api: AsyncClient, node: str, driver: str) -> str:
    """The most preferred resource.k8s.io version this server serves (a list of our own
    slices answers: 404 means not served)."""
    last: Exception | None = None
    for version in slices.API_VERSIONS:
        try:
            await _list(api, version, node, driver)
        except ApiError as e:
            if e.status.code == 404:
                last = e
                continue
            raise
        return version
    raise ConnectionError(f"the API server serves no {GROUP} version we write ({last})")


async def _list(api: AsyncClient, version: str, node: str, driver: str) -> dict[str, Any]:
    kind = _slice_kind(version)
    out: dict[str, Any] = {}
    async for obj in api.list(kind, fields={"spec.nodeName": node, "spec.driver": driver}):
        name = (obj.get("metadata") or {}).get("name")
        if name:
            out[name] = obj
    return out


class Publisher:
    """Keeps this node's slices equal to its pool; `generation` grows with every change."""

    def __init__(
        self,
        api: AsyncClient,
        node: str,
        driver: str,
        on_published: Callable[[frozenset[str]], None] = lambda _: None,
    ) -> None:
        self.api = api
        self.on_published = on_published
        """Told the GPUs (parent UUIDs) of every pool written."""
        self.node = node
        self.driver = driver
        self.version: str | None = None
        self.generation = 0
        self.published: slices.Pool | None = None
        """The pool as last written in full (None: not yet, or our slices were deleted)."""
        self.taints = True
        """Whether the server keeps DeviceTaints (DRADeviceTaints); found on the first write."""
        self._changes = 0
        self._pulse = aio.Pulse()

    def stale(self) -> None:
        """Our slices changed behind our back (deleted): publish again."""
        self.published = None
        self.changed()

    async def publish(self, pool: slices.Pool) -> bool:
        """Write the pool if it differs from what was published; True when it wrote."""
        if pool == self.published:
            return False
        if self.version is None:
            self.version = await served_version(self.api, self.node, self.driver)
            log.info("publishing ResourceSlices as %s/%s", GROUP, self.version)
            self._pulse.notify()  # the deletion watch waits for the version
        existing = await _list(self.api, self.version, self.node, self.driver)
        seen = [
            int(((o.get("spec") or {}).get("pool") or {}).get("generation") or 0)
            for o in existing.values()
        ]
        self.generation = max([self.generation, *seen]) + 1
        kind = _slice_kind(self.version)
        wanted = slices.bodies(pool, self.generation, self.version)
        for body in wanted:
            name = body["metadata"]["name"]
            old = existing.pop(name, None)
            stored = None
            if old is not None:
                body["metadata"]["resourceVersion"] = (old.get("metadata") or {}).get(
                    "resourceVersion"
                )
                try:
                    stored = await self.api.replace(kind.from_dict(body))
                except ApiError as e:
                    if e.status.code != 404:
                        raise
                    del body["metadata"]["resourceVersion"]  # deleted meanwhile: create it
            if stored is None:
                stored = await self.api.create(kind.from_dict(body))
            if self.taints and not slices.taints_kept(body, dict(stored)):
                self.taints = False
                log.warning(
                    "the API server drops DeviceTaints (feature gate DRADeviceTaints is off): "
                    "Unhealthy devices are published without a taint; their health is still "
                    "on the kubelet's DRA health stream"
                )
        for name in existing:  # a pool that shrank: its extra slices go
            try:
                await self.api.delete(kind, name=name)
            except ApiError as e:
                if e.status.code != 404:
                    raise
        self.published = pool
        self.on_published(pool.gpus)
        log.info("published %d DRA device(s) in %d ResourceSlice(s), pool %s generation %d",
                 len(pool.devices), len(wanted), pool.node, self.generation)  # fmt: skip
        return True

    async def run(
        self, desired: Callable[[bool], slices.Pool], delays: tuple[float, ...]
    ) -> NoReturn:
        """Publish `desired(taints)` now and after every change or deletion, for ever; API
        errors are retried with backoff (the plugin keeps serving prepares meanwhile)."""

        async def once() -> None:
            await self.publish(desired(self.taints))

        while True:
            seen = self._changes
            await retry.retrying(
                once, delays=delays, retry_on=(ApiError, OSError, Exception),
                what=f"publishing ResourceSlices for {self.node}",
            )  # fmt: skip
            await self._pulse.wait_for(lambda s=seen: self._changes != s)  # type: ignore[misc]

    def changed(self) -> None:
        """The pool may have changed (health, discovery, config): look again."""
        self._changes += 1
        self._pulse.notify()

    async def watch_deletions(self, delays: tuple[float, ...]) -> NoReturn:
        """Watch our own slices; a deletion (the kubelet's, anyone's) republishes them."""

        async def watch_once() -> None:
            while self.version is None:
                await self._pulse.wait_for(lambda: self.version is not None)
            kind = _slice_kind(self.version)
            fields: Any = {"spec.nodeName": self.node, "spec.driver": self.driver}
            async for event, obj in self.api.watch(kind, fields=fields):
                if event == "DELETED":
                    name = (obj.get("metadata") or {}).get("name", "?")
                    log.warning("ResourceSlice %s was deleted: publishing again",
                                cut_text(str(name), 100))  # fmt: skip
                    self.stale()
            raise ConnectionError("the ResourceSlice watch ended")

        await retry.retrying(
            watch_once, delays=delays, retry_on=(ApiError, OSError, Exception),
            what=f"watching the ResourceSlices of {self.node}",
        )  # fmt: skip
        raise RuntimeError("the ResourceSlice watch ended")


class ClaimReader:
    """GETs a ResourceClaim (its allocation) in the version the slices use."""

    def __init__(self, api: AsyncClient, publisher: Publisher, timeout: float) -> None:
        self.api = api
        self.publisher = publisher
        self.timeout = timeout

    async def read(self, ref: ClaimRef) -> Mapping[str, Any]:
        """The claim as a dict; raises LookupError with a message for the claim's error."""
        try:
            async with asyncio.timeout(self.timeout):
                version = self.publisher.version or await served_version(
                    self.api, self.publisher.node, self.publisher.driver
                )
                obj = await self.api.get(_claim_kind(version), ref.name, namespace=ref.namespace)
        except ApiError as e:
            raise LookupError(
                f"cannot read ResourceClaim {ref.namespace}/{ref.name}: "
                f"{cut_text(e.status.message or str(e.status.code), 200)}"
            ) from None
        except (TimeoutError, OSError, ConnectionError) as e:
            raise LookupError(
                f"cannot read ResourceClaim {ref.namespace}/{ref.name}: the API server did not "
                f"answer ({cut_text(str(e) or type(e).__name__, 100)})"
            ) from None
        return dict(obj)
