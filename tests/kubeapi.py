"""A small in-process stand-in for the Kubernetes API, over HTTP: one Node (GET, watch, and
a strategic-merge PATCH of its status conditions, merged by type), and Events (POST, PATCH).

Enough for `make test` to drive the node-label config switch without Go; `make e2e` runs the
same scenarios against a real kube-apiserver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
        self.writes = 0
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
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
                url = urllib.parse.urlsplit(target)
                query = urllib.parse.parse_qs(url.query)
                if method == "GET" and url.path == f"/api/v1/nodes/{self.node}":
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
                elif method == "GET" and url.path == "/api/v1/nodes" and "watch" in query:
                    await self._watch(writer, query.get("fieldSelector", [""])[0])
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
                await self._changed.wait_for(lambda s=seen: self.version != s)  # type: ignore[misc]
                seen = self.version
                event = json.dumps({"type": kind, "object": self._object()}).encode() + b"\n"
            kind = "MODIFIED"
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
