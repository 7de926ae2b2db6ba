"""Which named config this node uses: its label `nvidia.com/device-plugin.config`, read and
watched through the Kubernetes API, with NVIDIA's fallbacks (as its config-manager does, but
in our own loop, no sidecar).

lightkube is the client (async, small, typed; kubernetes-asyncio would bring aiohttp and a
much larger generated package). No API access (no token, RBAC denied, the server down) is one
log line: the node keeps the default config and the plugin keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, NoReturn

from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube import ConfigError as KubeConfigError
from lightkube.resources.core_v1 import Node

from aiodp.config import resolve
from aiodp.config.model import Config
from aiodp.kit import retry
from aiodp.kit.errors import cut_text

log = logging.getLogger(__name__)

SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TRANSIENT: Final = (ApiError, OSError, TimeoutError, Exception)
"""What the watch retries: anything the API or the connection raises (httpx2's errors are
plain Exceptions); an eternal watch that gives up would leave the node on a stale config."""


def client(
    config: Config, without: str = "this node keeps the default config"
) -> AsyncClient | None:
    """An API client from --kubeconfig or the pod's service account; None (with one line
    ending in `without`: what is missed) when there is neither."""
    try:
        if config.kubeconfig is not None:
            kube = KubeConfig.from_file(config.kubeconfig)
        elif SERVICE_ACCOUNT.is_dir():
            kube = KubeConfig.from_service_account(str(SERVICE_ACCOUNT))
        else:
            log.warning("no Kubernetes API access (no service account, no --kubeconfig): %s",
                        without)  # fmt: skip
            return None
    except (KubeConfigError, OSError, ValueError) as e:
        log.warning("no Kubernetes API access (%s): %s", cut_text(str(e), 200), without)
        return None
    return AsyncClient(kube)


async def read_label(api: AsyncClient, config: Config) -> str | None:
    """The node's label now (one GET, bounded); None with one line when it cannot be read."""
    try:
        async with asyncio.timeout(config.api_timeout):
            node = await api.get(Node, name=config.node_name)
    except Exception as e:  # any API or connection failure: the default config stays
        log.warning("cannot read node %s (%s): using the default config", config.node_name,
                    cut_text(str(e), 200))  # fmt: skip
        return None
    labels = (node.metadata.labels if node.metadata else None) or {}
    return labels.get(config.node_label)


async def run_label_watch(
    api: AsyncClient,
    config: Config,
    first: str | None,
    on_label: Callable[[str | None], Awaitable[None]],
) -> NoReturn:
    """Watch our own Node; every change of the label calls `on_label` (latest wins)."""
    last = first

    async def watch_once() -> None:
        nonlocal last
        async for _, node in api.watch(Node, fields={"metadata.name": config.node_name}):
            labels = (node.metadata.labels if node.metadata else None) or {}
            label = labels.get(config.node_label)
            if label != last:
                last = label
                log.info("node label %s is now %s", config.node_label, label or "unset")
                await on_label(label)
        raise ConnectionError("the node watch ended")

    await retry.retrying(
        watch_once, delays=config.register_backoff, retry_on=TRANSIENT,
        what=f"watching node {config.node_name}",
    )  # fmt: skip
    raise RuntimeError("the node watch ended")


async def first_label(config: Config) -> tuple[AsyncClient | None, str | None]:
    """At start, with --config-dir: the API client (None without access) and the node's
    label now (it decides the first registration)."""
    api = client(config)
    if api is None:
        return None, None
    return api, await read_label(api, config)


def with_label(config: Config, label: str) -> Config:
    """The start-up config with the config the node's label names (ConfigError if none)."""
    path = resolve.labelled_config_path(config, label)
    if path == config.config_file:
        return config
    log.info("node label %s=%s: config %s", config.node_label, label, path)
    return resolve.with_labelled_config(config, path)
