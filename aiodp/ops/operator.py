"""What the operator's view runs beside the plugins, started by one call (`tasks`): the
device and task gauges of /metrics, the GPU counters labelled by the pods holding each GPU
(when the kubelet's pod-resources socket answers), and the node condition and Events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

from aiodp.config.model import Config
from aiodp.gpus import health, sharing
from aiodp.gpus.backend import DeviceBackend, DeviceInfo, GpuMetrics
from aiodp.gpus.devices import DeviceRegistry, Health
from aiodp.gpus.live import Holder
from aiodp.kit import aio, metrics
from aiodp.ops import podresources
from aiodp.ops.status import Status

if TYPE_CHECKING:
    from lightkube import AsyncClient


def tasks(
    config: Config,
    backend: DeviceBackend,
    infos: Sequence[DeviceInfo],
    registry: DeviceRegistry,
    holder: Holder,
    status: Status,
    api: AsyncClient | None,
    stack: contextlib.AsyncExitStack,
) -> aio.Tasks:
    """Install the /metrics sources (removed when `stack` closes) and return the tasks:
    the GPU counters and pod attribution (with a device-metrics interval), node signals
    (with NODE_NAME) and GPU Feature Discovery's node labels (with --gfd and NODE_NAME)."""
    metrics.set_device_source(
        lambda: [
            (d.resource, d.id, d.health.value,
             metrics.reason_class(d.reason) if d.reason else "")
            for d in registry.inventory().devices
        ]
    )  # fmt: skip
    stack.callback(metrics.set_device_source, None)
    metrics.set_task_source(lambda: len(asyncio.all_tasks()))
    stack.callback(metrics.set_task_source, None)
    out: aio.Tasks = []
    if config.device_metrics_interval > 0:
        out += _device_metrics(config, backend, infos, registry, status, stack)
    if config.node_signals and config.node_name:
        out.append(("node-signals", _node_signals(config, api, registry, status)))
    if config.gfd and config.node_name:
        out.append(("node-labels", _node_labels(config, api, holder, registry, status)))
    return out


def _device_metrics(
    config: Config,
    backend: DeviceBackend,
    infos: Sequence[DeviceInfo],
    registry: DeviceRegistry,
    status: Status,
    stack: contextlib.AsyncExitStack,
) -> aio.Tasks:
    """The GPU counters on /metrics, labelled by the pods holding each GPU when the kubelet's
    pod-resources socket answers."""
    latest: dict[str, Mapping[str, object]] = {}
    gpus = {g.uuid: g for g in infos}
    migs = {m.uuid: (g, m) for g in infos for m in g.mig_devices}

    def keep(reading: Mapping[str, GpuMetrics]) -> None:
        latest.clear()
        latest.update({u: dataclasses.asdict(m) for u, m in reading.items()})

    def physical(resource: str, device_id: str) -> str | None:
        d = registry.get(device_id)
        return d.uuid if d is not None and d.resource == resource else None

    def claimed(driver: str, pool: str, name: str) -> str | None:
        if driver != config.dra_driver_name or (config.node_name and pool != config.node_name):
            return None
        resource = sharing.dra_resource(driver)
        for d in registry.inventory().for_resource(resource):
            if sharing.dra_device_name(d) == name:
                return d.uuid
        return None

    pods = None
    if config.pod_resources_socket is not None:
        pods = podresources.Attribution(config.pod_resources_socket, physical, claimed)

    def rows() -> list[metrics.GpuRow]:
        out: list[metrics.GpuRow] = []
        holders = pods.holders if pods is not None else {}
        for u, values in sorted(latest.items()):
            if u in gpus:
                g = gpus[u]
                base = {"gpu": str(g.index), "UUID": u, "modelName": g.name,
                        "GPU_I_ID": "", "GPU_I_PROFILE": ""}  # fmt: skip
                # a GPU in MIG mode is held through its MIG devices
                mine = [h for x in (u, *(m.uuid for m in g.mig_devices))
                        for h in holders.get(x, ())]  # fmt: skip
            elif u in migs:
                g, m = migs[u]
                base = {"gpu": str(g.index), "UUID": g.uuid, "modelName": g.name,
                        "GPU_I_ID": str(m.gi), "GPU_I_PROFILE": m.profile}  # fmt: skip
                mine = list(holders.get(u, ()))
            else:
                continue
            held = sorted(
                {(h.pod, h.namespace, h.container, h.claim_name, h.claim_namespace) for h in mine}
            )
            if len(held) > podresources.MAX_LABELLED_HOLDERS:
                held = []  # widely shared: once, unlabelled (aiodp_pod_devices names them)
            for pod, namespace, container, claim, claim_ns in held or [("", "", "", "", "")]:
                labels = {**base, "pod": pod, "namespace": namespace, "container": container,
                          "claim_name": claim, "claim_namespace": claim_ns}  # fmt: skip
                out.append((labels, values))
        return out

    status.reading(lambda: latest)
    metrics.set_gpu_source(rows)
    stack.callback(metrics.set_gpu_source, None)
    reading = health.run_device_metrics(
        backend, interval=config.device_metrics_interval, on_reading=keep
    )
    tasks: aio.Tasks = [("device-metrics", reading)]
    if pods is not None:
        attribution = pods

        def pod_rows() -> list[metrics.PodRow]:
            out = []
            for held in attribution.holders.values():
                for h in held:
                    d = registry.get(h.device)
                    healthy = d is not None and d.health is Health.HEALTHY
                    out.append((h.namespace, h.pod, h.container, h.resource, healthy))
            return out

        metrics.set_pod_source(pod_rows)
        stack.callback(metrics.set_pod_source, None)
        status.attributing(
            lambda: {
                (uuid if h.claim_name else h.device): f"{h.namespace}/{h.pod}/{h.container}"
                for uuid, held in attribution.holders.items()
                for h in held
            },  # a DRA device's ID in the registry is its UUID
            attribution.on_allocate,
            lambda: sorted(
                {
                    (f"{h.claim_namespace}/{h.claim_name}", f"{h.namespace}/{h.pod}/{h.container}",
                     h.device)
                    for held in attribution.holders.values()
                    for h in held
                    if h.claim_name
                }
            ),
        )  # fmt: skip
        tasks.append(("pod-resources", attribution.run(interval=config.device_metrics_interval)))
    return tasks


async def _api_after_ready(
    config: Config, api: AsyncClient | None, status: Status, without: str
) -> tuple[AsyncClient | None, bool]:
    """The API client once the plugin has registered (or --stream-open-timeout passed): its
    import and first call stay off the start-up path. (client, whether it is our own)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(config.stream_open_timeout):
            await status.ready.wait()
    if api is not None:
        return api, False
    from aiodp.config import pernode  # lightkube: after registration (start-up time)

    return pernode.client(config, without=without), True


async def _node_labels(
    config: Config,
    api: AsyncClient | None,
    holder: Holder,
    registry: DeviceRegistry,
    status: Status,
) -> NoReturn:
    """GPU Feature Discovery's labels, following the live plan. Without API access: one
    line, and nothing more to do."""
    api, own = await _api_after_ready(config, api, status, "no GPU Feature Discovery labels")
    if api is None:
        await asyncio.Event().wait()  # nothing to label with; the task tree keeps its shape
    assert api is not None
    from aiodp.ops import nodelabels

    try:
        publisher = nodelabels.NodeLabels(
            api, config.node_name, config.namespace, timeout=config.api_timeout,
            features=config.use_node_feature_api,
        )  # fmt: skip
        await nodelabels.run(publisher, holder, registry)
    finally:
        if own:
            await api.close()


async def _node_signals(
    config: Config, api: AsyncClient | None, registry: DeviceRegistry, status: Status
) -> NoReturn:
    """The node condition and Events on GPU faults, once the plugin has registered. Without
    API access: one line, and nothing more to do."""
    api, own = await _api_after_ready(
        config, api, status, "GPU faults reach no node condition or Event"
    )
    if api is None:
        await asyncio.Event().wait()  # nothing to signal with; the task tree keeps its shape
    assert api is not None
    from aiodp.ops import nodesignals

    try:
        signals = nodesignals.NodeSignals(
            api, config.node_name, nodesignals.boot_id(config.proc_root), config.api_timeout
        )
        await nodesignals.run(signals, registry)
    finally:
        if own:
            await api.close()
