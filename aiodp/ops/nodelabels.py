"""Which GPU Feature Discovery labels this node carries: ours, written once per change.

Where NFD's NodeFeature API is served and `use_node_feature_api` is on (GFD's default), the
labels go into the NodeFeature `nvidia-features-for-<node>` in our namespace, as GFD writes
it, and NFD puts them on the node. Otherwise the node's own labels are merge-patched. Either
way only keys GFD owns (`labels.OWNED`) are set or removed: anyone else's stay. Nothing is
written while the labels are the same, the timestamp aside; a write that fails is one line
and is tried again at the next change or after `RETRY` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final, NoReturn, cast

from lightkube import ApiError, AsyncClient
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Node
from lightkube.types import PatchType

from aiodp.gpus import labels
from aiodp.gpus.backend import LOST
from aiodp.gpus.devices import DeviceRegistry, Health
from aiodp.gpus.live import Holder
from aiodp.kit import aio
from aiodp.kit.errors import cut_text

log = logging.getLogger(__name__)

NODE_FEATURE: Final = create_namespaced_resource(
    "nfd.k8s-sigs.io", "v1alpha1", "NodeFeature", "nodefeatures"
)
NAME_PREFIX: Final = "nvidia-features-for"
NODE_NAME_LABEL: Final = "nfd.node.kubernetes.io/node-name"
RETRY: Final = 30.0
MAX_MACHINE_BYTES: Final = 256
"""The DMI product name is a short line; more is not read."""


def _same(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Equal but for the timestamp (which alone never causes a write)."""
    drop = labels.TIMESTAMP
    return {k: v for k, v in a.items() if k != drop} == {k: v for k, v in b.items() if k != drop}


def _not_found(e: BaseException) -> bool:
    """A 404: lightkube's ApiError for a Status answer, httpx's error for the plain-text one
    a server gives for an API group it does not serve."""
    if isinstance(e, ApiError):
        return e.status.code == 404
    return getattr(getattr(e, "response", None), "status_code", None) == 404


def read_machine(path: Path) -> str:
    """The machine type (DMI product name), `unknown` when unreadable; blocking."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_MACHINE_BYTES).decode("utf-8", "replace").strip() or "unknown"
    except OSError:
        return "unknown"


class NodeLabels:
    """Writes GFD's labels for one node, through a NodeFeature or the node itself."""

    def __init__(
        self, api: AsyncClient, node: str, namespace: str, *, timeout: float, features: bool
    ) -> None:
        self.api, self.node, self.namespace, self.timeout = api, node, namespace, timeout
        self.features = features
        """Whether to use the NodeFeature API where it is served."""
        self.via: str | None = None
        """`NodeFeature` or `node`, as the last write went (looked up at each write: NFD's
        CRD may come or go)."""
        self.trouble = aio.Trouble(log)

    @property
    def feature_name(self) -> str:
        return f"{NAME_PREFIX}-{self.node}"

    async def publish(self, wanted: Mapping[str, str]) -> bool:
        """Make ours equal `wanted`; True when something was written. Raises on API errors."""
        async with asyncio.timeout(self.timeout):
            via = await self._choose()  # each time: NFD's CRD may come (or go) later
            if via != self.via and via == "node" and self.features:
                log.info("NFD's NodeFeature API is not served: writing the node's labels")
            self.via = via
            if self.via == "NodeFeature":
                wrote = await self._feature(dict(wanted))
            else:
                wrote = await self._node(dict(wanted))
        if wrote:
            log.info("node %s: %d GPU Feature Discovery label(s) written to the %s",
                     self.node, len(wanted), self.via)  # fmt: skip
        return wrote

    async def _choose(self) -> str:
        if not self.features:
            return "node"
        try:
            async for _ in self.api.list(NODE_FEATURE, namespace=self.namespace, chunk_size=1):
                break
        except Exception as e:
            if _not_found(e):
                return "node"
            raise
        return "NodeFeature"

    async def _node(self, wanted: dict[str, str]) -> bool:
        node = await self.api.get(Node, name=self.node)
        current = (node.metadata.labels if node.metadata else None) or {}
        ours = {k: v for k, v in current.items() if labels.OWNED.match(k)}
        if _same(ours, wanted):
            return False
        patch: dict[str, str | None] = dict(wanted)
        patch.update({k: None for k in ours if k not in wanted})  # ours that no longer apply
        await self.api.patch(
            Node, self.node, {"metadata": {"labels": patch}}, patch_type=PatchType.MERGE
        )
        return True

    async def _feature(self, wanted: dict[str, str]) -> bool:
        body: dict[str, Any] = {
            "apiVersion": "nfd.k8s-sigs.io/v1alpha1",
            "kind": "NodeFeature",
            "metadata": {
                "name": self.feature_name,
                "namespace": self.namespace,
                "labels": {NODE_NAME_LABEL: self.node},
            },
            "spec": {"features": {}, "labels": wanted},
        }
        try:
            obj = await self.api.get(NODE_FEATURE, self.feature_name, namespace=self.namespace)
        except Exception as e:
            if not _not_found(e):
                raise
            await self.api.create(NODE_FEATURE.from_dict(body))
            return True
        current = cast(dict[str, Any], dict(obj))
        spec = current.get("spec") or {}
        if _same(spec.get("labels") or {}, wanted):
            return False
        body["metadata"]["resourceVersion"] = (current.get("metadata") or {}).get("resourceVersion")
        await self.api.replace(NODE_FEATURE.from_dict(body))
        return True


def _lost(registry: DeviceRegistry) -> frozenset[str]:
    return frozenset(
        d.gpu for d in registry.inventory().devices
        if d.health is Health.UNHEALTHY and d.reason.startswith(LOST)
    )  # fmt: skip


async def run(
    publisher: NodeLabels,
    holder: Holder,
    registry: DeviceRegistry,
    *,
    read: Callable[[Path], Awaitable[str]] | None = None,
    clock: Callable[[], float] = time.time,
) -> NoReturn:
    """Follow the live plan and the GPUs lost from the bus: labels computed at every change
    (reload, MIG strategy, sharing, rediscovery, a GPU lost or back) and written when they
    differ from the last written; a failed write is tried again after RETRY seconds."""
    reader = read or (lambda p: asyncio.to_thread(read_machine, p))
    written: Mapping[str, str] | None = None
    seen: tuple[int, frozenset[str]] | None = None
    while True:
        live, inventory, lost = holder.current(), registry.inventory().version, _lost(registry)
        if (live.version, lost) != seen or written is None:
            config = live.config
            machine = await reader(config.machine_type_file)
            stamp = None if config.no_timestamp else int(clock())
            wanted = labels.labels(live.gpus, config, machine=machine, timestamp=stamp,
                                   lost=lost)  # fmt: skip
            if written is None or not _same(wanted, written):
                try:
                    await publisher.publish(wanted)
                except Exception as e:  # no access, RBAC, the server down: one line, again
                    why = cut_text(f"{type(e).__name__}: {e}", 200)
                    publisher.trouble.failing(why, logging.WARNING,
                                              "node labels: cannot write node %s's labels (%s)",
                                              publisher.node, why)  # fmt: skip
                    written, seen = None, None
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(RETRY):
                            await holder.next_after(live.version)
                    continue
                publisher.trouble.cleared("node labels: written again")
                written = wanted
            seen = (live.version, lost)
        await aio.first_of({
            "plan": holder.next_after(live.version),
            "health": _changed_since(registry, inventory),
        })  # fmt: skip


async def _changed_since(registry: DeviceRegistry, version: int) -> None:
    while registry.inventory().version == version:
        await registry.changed()
