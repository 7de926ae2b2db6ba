"""Node signals against a real kube-apiserver and etcd: the GPUHealthy condition merged beside
the kubelet's own conditions (not replacing them), the Warning Event found by the node's name
as `kubectl describe node` finds it, and the condition cleared on recovery."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Event, Node

from tests.e2e.apiserver import ApiServer
from tests.harness import h100_node, running, write_atomically
from tests.integration.test_node_signals import BOOT, GPU2, proc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

NODE = "gpu-e2e-signals"


def conditions(node: Node) -> dict[str, Any]:
    return {c.type: c for c in (node.status.conditions if node.status else None) or []}


async def until_node(client: AsyncClient, ok: Callable[[Node], bool]) -> Node:
    """Watch our Node until `ok` holds (the first event is its state now)."""
    async for _, node in client.watch(Node, fields={"metadata.name": NODE}):
        if ok(node):
            return node
    raise AssertionError("the watch ended")


async def first_event(client: AsyncClient) -> Event:
    """The first Event on our Node, found by its name as `kubectl describe node` does."""
    async for _, event in client.watch(
        Event, namespace="default", fields={"involvedObject.name": NODE}
    ):
        return event
    raise AssertionError("the watch ended")


async def test_e2e_node_signals(short_dir: Path) -> None:
    async with ApiServer(short_dir) as api:
        status, _ = await api.call("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
        })  # fmt: skip
        assert status == 201
        status, _ = await api.call(  # the kubelet's own condition, as it patches it
            "PATCH", f"/api/v1/nodes/{NODE}/status",
            {"status": {"conditions": [{"type": "Ready", "status": "True",
                                        "reason": "KubeletReady", "message": "ok"}]}},
            content_type="application/strategic-merge-patch+json",
        )  # fmt: skip
        assert status == 200
        kubeconfig = api.kubeconfig(short_dir)
        client = AsyncClient(KubeConfig.from_file(kubeconfig))
        try:
            async with running(
                short_dir, node_name=NODE, kubeconfig=kubeconfig, proc_root=proc(short_dir)
            ) as rp:
                node = await until_node(client, lambda n: "GPUHealthy" in conditions(n))
                assert conditions(node)["GPUHealthy"].status == "True"

                write_atomically(rp.devices_file, h100_node({2: "XID 79 (simulated)"}))
                node = await until_node(
                    client, lambda n: conditions(n)["GPUHealthy"].status == "False"
                )
                cond = conditions(node)
                assert cond["Ready"].reason == "KubeletReady"  # merged beside, not replaced
                assert cond["GPUHealthy"].reason == "XidCriticalError"
                assert GPU2 in cond["GPUHealthy"].message
                assert f"boot {BOOT}" in cond["GPUHealthy"].message
                event = await first_event(client)
                assert event.type == "Warning"
                assert event.reason == "XIDError"
                assert event.involvedObject.kind == "Node"
                assert event.involvedObject.uid == NODE
                assert GPU2 in (event.message or "")

                write_atomically(rp.devices_file, h100_node())
                node = await until_node(
                    client, lambda n: conditions(n)["GPUHealthy"].status == "True"
                )
                assert conditions(node)["Ready"].status == "True"
        finally:
            await client.close()
