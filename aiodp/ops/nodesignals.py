"""Tell Kubernetes, not only Prometheus: a node condition and Warning Events on GPU faults.

On a critical XID (one the health policy acts on) or a lost GPU, the Node gets the condition
`GPUHealthy=False` (reason `XidCriticalError` or `GPULost`, the GPUs and the boot ID in the
message) and a Warning Event per GPU and reason; when every GPU is back the condition turns
`True`. While it is False it is refreshed every `REFRESH` seconds. A False condition left by
an earlier boot (another boot ID) is cleared at start; one from this boot stays until our
own view changes (a restarted plugin does not know what the last one saw).

Conditions are strategic-merge patched on nodes/status, which merges by `type`: the kubelet's
own conditions stay. Events are rate-limited: one per GPU and reason, then its `count` is
patched, and at most `MAX_EVENTS` keys are tracked. No API access is one line: nothing else
changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, cast

from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Event, Node
from lightkube.types import PatchType

from aiodp.gpus.backend import LOST
from aiodp.gpus.devices import DeviceRegistry, Health, Inventory
from aiodp.kit import aio, retry
from aiodp.kit.errors import cut_text

log = logging.getLogger(__name__)

CONDITION: Final = "GPUHealthy"
XID_EVENT: Final = "XIDError"
"""The Event reason on a critical XID (GKE's name); `GPULost` for a lost GPU."""
REFRESH: Final = 60.0
RETRY: Final = (1.0, 2.0, 5.0, 10.0)
"""Seconds before a failed write is tried again while the API is unreachable (an outage
ends without waiting for the next change or REFRESH); a refusal (401, 403) waits REFRESH."""
MAX_EVENTS: Final = 1024
MAX_PENDING: Final = 64
"""Events that could not be written, kept to write when the API answers again (a fault seen
during an outage is still recorded, though the GPU may have recovered since)."""
EVENT_NAMESPACE: Final = "default"
COMPONENT: Final = "aiodp"


@dataclass(frozen=True, slots=True)
class Fault:
    gpu: str
    """The physical GPU's UUID."""
    index: str
    reason: str
    """The device's reason, e.g. `XID 79 (...)` or `GPU is lost`."""

    @property
    def kind(self) -> str:
        return "GPULost" if self.reason.startswith(LOST) else "XidCriticalError"


def critical(inventory: Inventory) -> tuple[Fault, ...]:
    """The physical GPUs that are Unhealthy for a critical XID or because they are lost."""
    out: dict[str, Fault] = {}
    for d in inventory.devices:
        if d.health is not Health.UNHEALTHY or d.gpu in out:
            continue
        if d.reason.startswith(("XID ", LOST)):
            out[d.gpu] = Fault(d.gpu, d.index.split(":")[0], cut_text(d.reason, 120))
    return tuple(sorted(out.values(), key=lambda f: f.gpu))


def boot_id(proc_root: Path) -> str:
    try:
        return (proc_root / "sys/kernel/random/boot_id").read_text().strip()[:64]
    except OSError:
        return "unknown"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(faults: Iterable[Fault], boot: str) -> dict[str, Any]:
    """The condition for these faults (none: `True`)."""
    faults = tuple(faults)
    now = _now()
    if not faults:
        status, reason, message = "True", "GPUsHealthy", f"every GPU healthy; boot {boot}"
    else:
        reason = "GPULost" if all(f.kind == "GPULost" for f in faults) else "XidCriticalError"
        gpus = "; ".join(f"GPU {f.index} {f.gpu}: {f.reason}" for f in faults[:8])
        more = f"; and {len(faults) - 8} more" if len(faults) > 8 else ""
        status, message = "False", f"{gpus}{more}; boot {boot}"
    return {
        "type": CONDITION,
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }


class NodeSignals:
    def __init__(self, api: AsyncClient, node: str, boot: str, timeout: float) -> None:
        self.api, self.node, self.boot, self.timeout = api, node, boot, timeout
        self.sent: tuple[str, str] | None = None
        """(status, message) last patched; None before the first."""
        self.events: dict[tuple[str, str], tuple[str, int]] = {}
        """(GPU, reason) -> (Event name, count)"""
        self.trouble = aio.Trouble(log)
        self.seen: set[Fault] = set()
        self.hold = False
        """A False condition of this boot found at start: kept until we see a fault."""
        self.pending: list[Fault] = []
        """Events not written yet (the API was unreachable), oldest first."""
        self.unreachable = False
        """The last write failed other than by a refusal: retry on RETRY, not REFRESH."""

    async def start(self) -> bool:
        """Read our condition; clear one left by another boot. False (one line) without API."""
        try:
            async with asyncio.timeout(self.timeout):
                node = await self.api.get(Node, name=self.node)
        except Exception as e:  # no access, RBAC denied, the server down: one line, go on
            self._failed("read", e)
            return False
        for c in (node.status.conditions if node.status else None) or []:
            if c.type != CONDITION:
                continue
            self.sent = (c.status, c.message or "")
            if c.status != "False":
                continue
            if f"boot {self.boot}" in (c.message or ""):
                self.hold = True
                log.info("node condition %s=False from this boot stays: %s", CONDITION,
                         cut_text(c.message or "", 200))  # fmt: skip
            else:
                log.info("node condition %s=False is from an earlier boot: clearing", CONDITION)
                await self._patch(condition((), self.boot))
        return True

    async def update(self, faults: tuple[Fault, ...], *, refresh: bool = False) -> None:
        """Patch the condition for these faults when it changed (or, while False, to refresh
        it), and record an Event for each new (GPU, reason)."""
        new = sorted((f for f in faults if f not in self.seen), key=lambda f: f.gpu)
        self.seen = set(faults)
        if faults:
            self.hold = False
        cond = condition(faults, self.boot)
        now = (cond["status"], cond["message"])
        if not self.hold and (
            self.sent is None or now != self.sent or (refresh and now[0] == "False")
        ):
            if self.sent is not None and self.sent[0] == now[0]:
                del cond["lastTransitionTime"]  # same status: keep the transition time
            await self._patch(cond)
        waiting, self.pending = self.pending, []
        for f in [*waiting, *new]:
            if not await self._event(f):
                self._keep(f)

    def note(self, faults: tuple[Fault, ...]) -> None:
        """Before the first successful read: remember new faults' Events for later."""
        for f in sorted((f for f in faults if f not in self.seen), key=lambda f: f.gpu):
            self._keep(f)
        self.seen = set(faults)

    def _keep(self, f: Fault) -> None:
        if f in self.pending:
            return
        if len(self.pending) >= MAX_PENDING:
            dropped = self.pending.pop(0)
            log.warning("node signals: Event for GPU %s (%s) dropped: %d Events wait for the API",
                        dropped.gpu, cut_text(dropped.reason, 80), MAX_PENDING)  # fmt: skip
        self.pending.append(f)

    async def _patch(self, cond: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.api.patch(
                    Node.Status,
                    self.node,
                    {"status": {"conditions": [cond]}},
                    patch_type=PatchType.STRATEGIC,
                )
        except Exception as e:  # one line; tried again after RETRY (or the next change)
            self._failed("patch the condition of", e)
            self.sent = None
            return
        self._ok()
        self.sent = (cond["status"], cond["message"])
        log.info("node %s: condition %s=%s (%s)", self.node, CONDITION, cond["status"],
                 cond["message"])  # fmt: skip

    async def _event(self, f: Fault) -> bool:
        """Record (or count) the Event; False when the API could not be reached."""
        key = (f.gpu, f.reason.split(":")[0].split(" (")[0])
        known = self.events.get(key)
        try:
            async with asyncio.timeout(self.timeout):
                if known is None:
                    if len(self.events) >= MAX_EVENTS:
                        return True
                    made = await self.api.create(cast(Event, Event.from_dict(self._event_body(f))))
                    name = made.metadata.name if made.metadata else ""
                    self.events[key] = (name or "", 1)
                else:
                    name, count = known
                    await self.api.patch(
                        Event, name,
                        {"count": count + 1, "lastTimestamp": _now(), "message": self._message(f)},
                        namespace=EVENT_NAMESPACE, patch_type=PatchType.MERGE,
                    )  # fmt: skip
                    self.events[key] = (name, count + 1)
        except Exception as e:
            self._failed("record an Event on", e)
            return self._refused(e)
        self._ok()
        return True

    def _message(self, f: Fault) -> str:
        return f"GPU {f.index} {f.gpu}: {f.reason}"

    def _event_body(self, f: Fault) -> dict[str, Any]:
        now = _now()
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{self.node}.gpu-", "namespace": EVENT_NAMESPACE},
            "involvedObject": {"kind": "Node", "name": self.node, "uid": self.node},
            "type": "Warning",
            "reason": XID_EVENT if f.kind == "XidCriticalError" else "GPULost",
            "message": self._message(f),
            "source": {"component": COMPONENT, "host": self.node},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }

    @staticmethod
    def _refused(e: BaseException) -> bool:
        """A 401 or 403: RBAC says no, which a retry soon does not change."""
        return isinstance(e, ApiError) and e.status.code in (401, 403)

    def _failed(self, what: str, e: BaseException) -> None:
        self.unreachable = not self._refused(e)
        why = cut_text(f"{type(e).__name__}: {e}", 200)
        self.trouble.failing(
            why, logging.WARNING,
            "node signals: cannot %s node %s (%s); the plugin goes on without them",
            what, self.node, why,
        )  # fmt: skip

    def _ok(self) -> None:
        self.unreachable = False
        self.trouble.cleared("node signals: the API answers again")


async def run(signals: NodeSignals, registry: DeviceRegistry) -> NoReturn:
    """Follow the registry: patch on every change of the critical set, refresh while False
    every REFRESH seconds; while the API is unreachable (at start too) try again on RETRY."""
    waits = retry.backoff(RETRY)
    started = False
    last: tuple[Fault, ...] | None = None
    while True:
        inventory = registry.inventory()
        faults = critical(inventory)
        if not started:
            signals.note(faults)  # faults before the API answered: their Events wait
            started = await signals.start()
            if not started and not signals.unreachable:
                await asyncio.Event().wait()  # refused (RBAC): said once; nothing else to do
        if started:
            await signals.update(faults, refresh=faults == last)
        last = faults
        if not signals.unreachable:
            waits = retry.backoff(RETRY)
        if registry.inventory().version != inventory.version:
            continue  # it changed while we wrote (or started): look again at once
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(next(waits) if signals.unreachable else REFRESH):
                await registry.changed()
