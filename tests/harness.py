"""Helpers to run the real plugin (app.main) against the kubelet stand-in in one loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiodp import app
from aiodp.config import resolve as cfg
from aiodp.config.model import Config
from aiodp.gpus.backend import DeviceBackend
from aiodp.kit import metrics
from aiodp.ops.status import Status
from aiodp.standins.kubelet import FakeKubelet
from aiodp.standins.testbed import h100_node, http_get, next_update, write_atomically

__all__ = ["Running", "h100_node", "next_update", "running", "scrape", "write_atomically"]


@dataclass
class Running:
    config: Config
    kubelet: FakeKubelet | None
    stop: asyncio.Event
    ready: asyncio.Event
    state: Status
    task: asyncio.Task[int]
    devices_file: Path

    @property
    def k(self) -> FakeKubelet:
        assert self.kubelet is not None
        return self.kubelet

    @property
    def address(self) -> str:
        """The metrics server's HOST:PORT (the plugin runs with a metrics address)."""
        assert self.state.endpoint is not None
        return self.state.endpoint.address


async def scrape(rp: Running) -> dict[str, float]:
    """/metrics, parsed by prometheus_client's own parser (metrics.samples)."""
    return metrics.samples(await http_get(rp.address, "/metrics"))


@contextlib.asynccontextmanager
async def running(
    directory: Path,
    *,
    kubelet: bool = True,
    kubelet_options: dict[str, Any] | None = None,
    node: str | None = None,
    expect_code: int = 0,
    make_backend: Callable[[Config], DeviceBackend] | None = None,
    **overrides: Any,
) -> AsyncIterator[Running]:
    """Start the kubelet stand-in (unless `kubelet=False`) and the plugin; stop both after."""
    devices_file = directory / "devices.yaml"
    devices_file.write_text(node if node is not None else h100_node())
    explicit = {
        "backend": "simulated",
        "simulated_devices": devices_file,
        "kubelet_socket": directory / "kubelet.sock",
        "metrics_address": "",
        "pod_resources_socket": directory / "pod-resources" / "kubelet.sock",
        **overrides,
    }
    path = explicit.get("config_file")
    config = cfg.build(explicit, cfg.load(path) if isinstance(path, Path) else None)
    stop, status = asyncio.Event(), Status()
    async with contextlib.AsyncExitStack() as stack:
        fk = None
        if kubelet:
            fk = await stack.enter_async_context(FakeKubelet(directory, **(kubelet_options or {})))
        task = asyncio.create_task(
            app.main(
                config,
                backend=make_backend(config) if make_backend else None,
                stop=stop,
                status=status,
            ),
            name="plugin-under-test",
        )
        try:
            yield Running(config, fk, stop, status.ready, status, task, devices_file)
        finally:
            stop.set()
            code = await task
        assert code == expect_code
