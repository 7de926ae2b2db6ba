"""A small in-process stand-in for the Kubernetes API: one Node, GET and watch, over HTTP.

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
        }  # fmt: skip

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
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                self.requests.append(f"{method} {target}")
                url = urllib.parse.urlsplit(target)
                query = urllib.parse.parse_qs(url.query)
                if method == "GET" and url.path == f"/api/v1/nodes/{self.node}":
                    await self._send(writer, 200, self._object())
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
