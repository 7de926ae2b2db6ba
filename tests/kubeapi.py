"""A small in-process stand-in for the Kubernetes API, over HTTP: one Node (GET, watch, and
a strategic-merge PATCH of its status conditions, merged by type), Events (POST, PATCH), and
DRA's ResourceSlices (list by field selector, create, replace, delete, watch) and
ResourceClaims (GET) in the `resource.k8s.io` versions it is told to serve.

Enough for `make test` to drive the node-label config switch without Go; `make e2e` runs the
same scenarios against a real kube-apiserver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any, Self


class FakeApi:
    def __init__(self, node: str, labels: dict[str, str] | None = None) -> None:
        self.node = node
        self.labels = dict(labels or {})
        self.version = 1
        self.requests: list[str] = []
        self.conditions: list[dict[str, Any]] = [
            {"type": "Ready", "status": "True", "reason": "KubeletReady"}  # the kubelet's own
        ]
        self.events: dict[str, dict[str, Any]] = {}
        self.deny: bool = False
        """Answer 403 to every status PATCH and Event write (RBAC without our rules)."""
        self.unavailable: bool = False
        """Answer 503 to every node GET, status PATCH and Event write (an API server
        restarting)."""
        self.writes = 0
        self.resource_versions: tuple[str, ...] = ("v1", "v1beta2", "v1beta1")
        """The resource.k8s.io versions served (others answer 404)."""
        self.slices: dict[str, dict[str, Any]] = {}
        self.claims: dict[tuple[str, str], dict[str, Any]] = {}
        self.slice_events: list[tuple[str, dict[str, Any]]] = []
        self.slice_event_times: list[float] = []
        """time.monotonic() of each slice event (to compare with the kubelet stand-in's)."""
        self.keep_taints = True
        """False: drop DeviceTaints on write, as a server without DRADeviceTaints does."""
        self.down = False
        """True: answer 503 to every resource.k8s.io request (an API server going away)."""
        self.node_features: dict[str, dict[str, Any]] | None = None
        """NFD's NodeFeature objects by name (None: the nfd.k8s-sigs.io API is not served)."""
        self.label_writes = 0
        """Merge patches of the node's labels and NodeFeature writes applied."""
        self._rv = 100
        self._closed = False
        """Set on exit: the watches end on their own (no cancelled handler tasks)."""
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        async with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._server.close()
        for w in list(self._writers):
            w.close()
        if self._tasks:  # closed connections and ended watches let the handlers return
            await asyncio.wait(list(self._tasks), timeout=2)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))  # fmt: skip
        return path

    async def label(self, value: str | None, key: str = "nvidia.com/device-plugin.config") -> None:
        """Set or remove the label; watchers get a MODIFIED event."""
        async with self._changed:
            if value is None:
                self.labels.pop(key, None)
            else:
                self.labels[key] = value
            self.version += 1
            self._changed.notify_all()

    def _object(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node, "labels": dict(self.labels),
                         "resourceVersion": str(self.version)},
            "status": {"conditions": [dict(c) for c in self.conditions]},
        }  # fmt: skip

    def condition(self, kind: str) -> dict[str, Any] | None:
        return next((c for c in self.conditions if c["type"] == kind), None)

    async def wait_writes(self, count: int) -> None:
        """Until `count` condition patches and Event writes have been applied in all."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.writes >= count)

    async def _patch_status(self, body: Any) -> None:
        async with self._changed:
            for new in body["status"]["conditions"]:  # strategic merge: by `type`
                old = self.condition(new["type"])
                if old is None:
                    self.conditions.append(dict(new))
                else:
                    old.update(new)
            self.writes += 1
            self._changed.notify_all()

    async def _patch_labels(self, body: dict[str, Any]) -> None:
        """A JSON merge patch of metadata.labels (null removes a key)."""
        async with self._changed:
            for key, value in ((body.get("metadata") or {}).get("labels") or {}).items():
                if value is None:
                    self.labels.pop(key, None)
                else:
                    self.labels[key] = value
            self.version += 1
            self.label_writes += 1
            self._changed.notify_all()

    async def wait_requests(self, check: Any) -> None:
        """Until a request line (`PATCH /api/v1/nodes/x`) satisfies `check`."""
        async with self._changed:
            await self._changed.wait_for(lambda: any(check(r) for r in self.requests))

    async def wait_label_writes(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.label_writes >= count)

    async def _node_feature(
        self, writer: asyncio.StreamWriter, method: str, path: str, body: Any
    ) -> None:
        parts = path.split("/")  # /apis/nfd.k8s-sigs.io/v1alpha1/namespaces/<ns>/nodefeatures[/n]
        if self.node_features is None or len(parts) < 7 or parts[6] != "nodefeatures":
            # as a real server answers for an API group it does not serve: plain text
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 19\r\n\r\n404 page not found\n")  # fmt: skip
            await writer.drain()
            return
        name = parts[7] if len(parts) > 7 else None
        store = self.node_features
        if method == "GET" and name is None:
            meta = {"resourceVersion": self._next_rv()}
            listing = {"kind": "NodeFeatureList", "items": list(store.values()), "metadata": meta}
            await self._send(writer, 200, listing)
        elif method == "GET" and name in store:
            await self._send(writer, 200, store[name])
        elif method == "POST" and name is None and body["metadata"]["name"] not in store:
            async with self._changed:
                body["metadata"]["resourceVersion"] = self._next_rv()
                store[body["metadata"]["name"]] = body
                self.label_writes += 1
                self._changed.notify_all()
            await self._send(writer, 201, body)
        elif method == "PUT" and name in store:
            if (
                body["metadata"].get("resourceVersion")
                != store[name]["metadata"]["resourceVersion"]
            ):
                await self._send(writer, 409, {"kind": "Status", "code": 409})
                return
            async with self._changed:
                body["metadata"]["resourceVersion"] = self._next_rv()
                store[name] = body
                self.label_writes += 1
                self._changed.notify_all()
            await self._send(writer, 200, body)
        else:
            await self._send(writer, 404, {"kind": "Status", "code": 404})

    async def _event(self, body: dict[str, Any]) -> dict[str, Any]:
        async with self._changed:
            meta = body.setdefault("metadata", {})
            if "name" not in meta:
                meta["name"] = f"{meta.get('generateName', 'event.')}{len(self.events):05d}"
            self.events[meta["name"]] = body
            self.writes += 1
            self._changed.notify_all()
            return body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else None
                self.requests.append(f"{method} {target}")
                async with self._changed:
                    self._changed.notify_all()
                url = urllib.parse.urlsplit(target)
                query = urllib.parse.parse_qs(url.query)
                if self.unavailable and (
                    method in ("PATCH", "POST") or url.path == f"/api/v1/nodes/{self.node}"
                ):
                    down = {"kind": "Status", "code": 503, "message": "unavailable (the fake)"}
                    await self._send(writer, 503, down)
                elif method == "GET" and url.path == f"/api/v1/nodes/{self.node}":
                    await self._send(writer, 200, self._object())
                elif method in ("PATCH", "POST") and self.deny:
                    await self._send(writer, 403, {"kind": "Status", "code": 403,
                                                   "message": "forbidden by the fake"})  # fmt: skip
                elif method == "PATCH" and url.path == f"/api/v1/nodes/{self.node}/status":
                    await self._patch_status(body)
                    await self._send(writer, 200, self._object())
                elif method == "POST" and url.path == "/api/v1/namespaces/default/events":
                    await self._send(writer, 201, await self._event(body or {}))
                elif method == "PATCH" and url.path.startswith(
                    "/api/v1/namespaces/default/events/"
                ):
                    name = url.path.rsplit("/", 1)[1]
                    await self._send(
                        writer, 200, await self._event({**self.events[name], **(body or {})})
                    )
                elif method == "PATCH" and url.path == f"/api/v1/nodes/{self.node}":
                    await self._patch_labels(body or {})
                    await self._send(writer, 200, self._object())
                elif url.path.startswith("/apis/nfd.k8s-sigs.io/v1alpha1/"):
                    await self._node_feature(writer, method, url.path, body)
                elif method == "GET" and url.path == "/api/v1/nodes" and "watch" in query:
                    await self._watch(writer, query.get("fieldSelector", [""])[0])
                    return
                elif url.path.startswith("/apis/resource.k8s.io/"):
                    if await self._resource(writer, method, url.path, query, body):
                        return
                else:
                    await self._send(writer, 404, {"kind": "Status", "code": 404})
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            if me is not None:
                self._tasks.discard(me)
            writer.close()

    # -- resource.k8s.io ---------------------------------------------------------------------

    def _slice_event(self, kind: str, obj: dict[str, Any]) -> None:
        self.slice_events.append((kind, obj))
        self.slice_event_times.append(time.monotonic())

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def slices_of(self, node: str) -> list[dict[str, Any]]:
        return [s for s in self.slices.values() if s["spec"].get("nodeName") == node]

    async def wait_slices(self, check: Any) -> None:
        """Until `check(slices)` holds for the stored slices."""
        async with self._changed:
            await self._changed.wait_for(lambda: check(list(self.slices.values())))

    async def put_claim(self, claim: dict[str, Any]) -> None:
        meta = claim["metadata"]
        async with self._changed:
            self.claims[(meta["namespace"], meta["name"])] = claim

    async def delete_slices(self) -> None:
        """Delete every slice, as the kubelet does at its start."""
        async with self._changed:
            for name in list(self.slices):
                self._slice_event("DELETED", self.slices.pop(name))
            self._changed.notify_all()

    def _stored(self, version: str, body: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(json.dumps(body))
        obj["apiVersion"] = f"resource.k8s.io/{version}"
        obj.setdefault("metadata", {})["resourceVersion"] = self._next_rv()
        if not self.keep_taints:
            for d in obj["spec"].get("devices") or []:
                (d.get("basic") or d).pop("taints", None)
        return obj

    async def _resource(
        self, writer: asyncio.StreamWriter, method: str, path: str,
        query: dict[str, list[str]], body: Any,
    ) -> bool:  # fmt: skip
        """Serve one resource.k8s.io request; True when the connection was taken (a watch)."""
        parts = path.strip("/").split("/")  # apis, resource.k8s.io, version, ...
        version, rest = parts[2], parts[3:]
        if self.down:
            await self._send(writer, 503, {"kind": "Status", "code": 503, "message": "down"})
            return False
        if version not in self.resource_versions:
            await self._send(writer, 404, {"kind": "Status", "code": 404})
            return False
        if rest[:1] == ["resourceslices"]:
            name = rest[1] if len(rest) > 1 else None
            if method == "GET" and name is None and "watch" in query:
                await self._watch_slices(writer)
                return True
            async with self._changed:
                if method == "GET" and name is None:
                    selector = dict(
                        kv.split("=", 1) for kv in query.get("fieldSelector", [""])[0].split(",")
                        if "=" in kv
                    )  # fmt: skip
                    items = [
                        s for s in self.slices.values()
                        if all(
                            s["spec"].get("nodeName" if k == "spec.nodeName" else "driver") == v
                            for k, v in selector.items()
                        )
                    ]  # fmt: skip
                    await self._send(writer, 200, {
                        "kind": "ResourceSliceList", "apiVersion": f"resource.k8s.io/{version}",
                        "metadata": {"resourceVersion": str(self._rv)}, "items": items,
                    })  # fmt: skip
                elif method == "POST" and name is None:
                    key = body["metadata"]["name"]
                    if key in self.slices:
                        await self._send(writer, 409, {"kind": "Status", "code": 409})
                    else:
                        self.slices[key] = obj = self._stored(version, body)
                        self._slice_event("ADDED", obj)
                        self._changed.notify_all()
                        await self._send(writer, 201, obj)
                elif method == "PUT" and name in self.slices:
                    old = self.slices[name]
                    if (
                        body["metadata"].get("resourceVersion")
                        != old["metadata"]["resourceVersion"]
                    ):
                        await self._send(writer, 409, {"kind": "Status", "code": 409})
                    else:
                        self.slices[name] = obj = self._stored(version, body)
                        self._slice_event("MODIFIED", obj)
                        self._changed.notify_all()
                        await self._send(writer, 200, obj)
                elif method == "DELETE" and name in self.slices:
                    obj = self.slices.pop(name)
                    self._slice_event("DELETED", obj)
                    self._changed.notify_all()
                    await self._send(writer, 200, {"kind": "Status", "code": 200})
                else:
                    await self._send(writer, 404, {"kind": "Status", "code": 404})
            return False
        if (
            method == "GET"
            and len(rest) == 4
            and rest[0] == "namespaces"
            and rest[2] == "resourceclaims"
        ):
            claim = self.claims.get((rest[1], rest[3]))
            if claim is None:
                await self._send(writer, 404, {"kind": "Status", "code": 404,
                                               "message": "resourceclaims not found"})  # fmt: skip
            else:
                await self._send(writer, 200, claim)
            return False
        await self._send(writer, 404, {"kind": "Status", "code": 404})
        return False

    async def _watch_slices(self, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        seen = len(self.slice_events)
        while True:
            async with self._changed:
                await self._changed.wait_for(
                    lambda s=seen: len(self.slice_events) > s or self._closed  # type: ignore[misc]
                )
                if self._closed:
                    return
                batch = self.slice_events[seen:]
                seen = len(self.slice_events)
            for kind, obj in batch:
                event = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()

    async def _send(self, writer: asyncio.StreamWriter, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {code} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    async def _watch(self, writer: asyncio.StreamWriter, selector: str) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        if selector not in ("", f"metadata.name={self.node}"):
            return
        seen, kind = 0, "ADDED"
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda s=seen: self.version != s or self._closed)  # type: ignore[misc]
                if self._closed:
                    return
                seen = self.version
                event = json.dumps({"type": kind, "object": self._object()}).encode() + b"\n"
            kind = "MODIFIED"
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
