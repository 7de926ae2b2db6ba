"""GPU Feature Discovery's labels against a real kube-apiserver and etcd: merge-patched on
the Node beside everyone else's without NFD, and in a NodeFeature object once NFD's CRD is
installed (NFD's master would copy them to the node; it does not run here)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx2
import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import Node

from aiodp.gpus import labels
from tests.e2e.apiserver import ApiServer
from tests.e2e.conftest import report
from tests.harness import running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

NODE = "gpu-e2e-labels"
THEIRS = {"nvidia.com/gpu.present": "true", "nvidia.com/device-plugin.config": "a100"}
NODE_FEATURE = create_namespaced_resource(
    "nfd.k8s-sigs.io", "v1alpha1", "NodeFeature", "nodefeatures"
)
CRD: dict[str, Any] = {  # NFD's NodeFeature CRD, cut to what GFD writes
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "nodefeatures.nfd.k8s-sigs.io"},
    "spec": {
        "group": "nfd.k8s-sigs.io",
        "names": {"kind": "NodeFeature", "listKind": "NodeFeatureList",
                  "plural": "nodefeatures", "singular": "nodefeature"},
        "scope": "Namespaced",
        "versions": [{
            "name": "v1alpha1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "properties": {
                    "features": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                }},
            }}},
        }],
    },
}  # fmt: skip


async def make_node(api: ApiServer) -> None:
    status, _ = await api.call("POST", "/api/v1/nodes", {
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": THEIRS},
    })  # fmt: skip
    assert status == 201


async def until_node(client: AsyncClient, ok: Callable[[Node], bool]) -> Node:
    async for _, node in client.watch(Node, fields={"metadata.name": NODE}):
        if ok(node):
            return node
    raise AssertionError("the watch ended")


async def until_feature(client: AsyncClient, name: str) -> Any:
    """Watch NodeFeatures until ours is there. A CRD just established answers a watch with
    429 while its watch cache fills: the server's Retry-After is honoured, a few times."""
    for _ in range(30):
        try:
            async for _, obj in client.watch(NODE_FEATURE, namespace="default"):
                if obj["metadata"]["name"] == name:
                    return obj
        except httpx2.HTTPStatusError as e:
            if e.response.status_code != 429:
                raise
            await asyncio.sleep(float(e.response.headers.get("Retry-After", "1")))
    raise AssertionError("the NodeFeature watch was refused 30 times")


def ours(node: Node) -> dict[str, str]:
    got = (node.metadata.labels if node.metadata else None) or {}
    return {k: v for k, v in got.items() if labels.OWNED.match(k)}


def options(short_dir: Path, kubeconfig: Path) -> dict[str, Any]:
    machine = short_dir / "product_name"
    machine.write_text("NVIDIA DGX H100\n")
    return {"node_name": NODE, "kubeconfig": kubeconfig, "gfd": True, "node_signals": False,
            "machine_type_file": machine, "namespace": "default"}  # fmt: skip


async def test_e2e_node_labels_on_the_node_without_nfd(short_dir: Path) -> None:
    async with ApiServer(short_dir) as api:
        await make_node(api)
        kubeconfig = api.kubeconfig(short_dir)
        client = AsyncClient(KubeConfig.from_file(kubeconfig))
        try:
            async with running(short_dir, **options(short_dir, kubeconfig)):
                node = await until_node(client, lambda n: bool(ours(n)))
                got = ours(node)
                assert got["nvidia.com/gpu.count"] == "8"
                assert got["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
                assert got["nvidia.com/gpu.machine"] == "NVIDIA-DGX-H100"
                assert got["nvidia.com/gpu.family"] == "hopper"
                assert node.metadata is not None
                labelled = node.metadata.labels or {}
                assert {k: labelled[k] for k in THEIRS} == THEIRS
            report("GFD labels (no NFD CRD): "
                       f"{len(got)} labels merge-patched on the node, theirs kept")  # fmt: skip
        finally:
            await client.close()


async def test_e2e_node_labels_in_a_node_feature_with_nfds_crd(short_dir: Path) -> None:
    async with ApiServer(short_dir) as api:
        await make_node(api)
        kubeconfig = api.kubeconfig(short_dir)
        client = AsyncClient(KubeConfig.from_file(kubeconfig))
        try:
            await client.create(
                cast(CustomResourceDefinition, CustomResourceDefinition.from_dict(CRD))
            )
            await client.wait(
                CustomResourceDefinition, CRD["metadata"]["name"], for_conditions=["Established"]
            )
            async with running(short_dir, **options(short_dir, kubeconfig)):
                name = f"nvidia-features-for-{NODE}"
                feature = await until_feature(client, name)
                got = feature["spec"]["labels"]
                assert got["nvidia.com/gpu.count"] == "8"
                assert feature["metadata"]["labels"] == {"nfd.node.kubernetes.io/node-name": NODE}
                node = await client.get(Node, name=NODE)
                assert ours(node) == {}  # NFD's master copies them; we do not patch the node
            report(f"GFD labels (NFD CRD installed): {len(got)} labels in NodeFeature {name}")
        finally:
            await client.close()
