"""Per-node configs by label against a real kube-apiserver and etcd: create the Node, label
it, relabel it, and watch the plugin switch configs, re-registering only what changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.apiserver import ApiServer
from tests.harness import next_update, running
from tests.integration.test_node_config import THREE, config_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

NODE = "gpu-e2e-1"
LABEL = "nvidia.com/device-plugin.config"


async def test_e2e_node_config_follows_the_label(short_dir: Path) -> None:
    async with ApiServer(short_dir) as api:
        status, _ = await api.call("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {LABEL: "default"}},
        })  # fmt: skip
        assert status == 201

        async def relabel(value: str) -> None:
            status, node = await api.call(
                "PATCH", f"/api/v1/nodes/{NODE}", {"metadata": {"labels": {LABEL: value}}},
                content_type="application/merge-patch+json",
            )  # fmt: skip
            assert status == 200, node

        async with running(
            short_dir, node=THREE, config_dir=config_dir(short_dir), node_name=NODE,
            kubeconfig=api.kubeconfig(short_dir),
        ) as rp:  # fmt: skip
            assert (await rp.k.registrations.get()).resource == "nvidia.com/gpu"
            await next_update(rp.k, lambda u: len(u.devices) == 3)
            await rp.state.wait_for(
                lambda: "node-label-watch" in [t.get_name() for t in rp.state.eternal]
            )
            started = rp.state.started
            await relabel("sliced")
            assert (await rp.k.registrations.get()).resource == "nvidia.com/gpu.shared"
            await next_update(
                rp.k, lambda u: u.resource == "nvidia.com/gpu" and len(u.devices) == 2
            )
            await relabel("default")
            await rp.state.wait_for(lambda: rp.state.wanted == ("nvidia.com/gpu",))
            await next_update(
                rp.k, lambda u: u.resource == "nvidia.com/gpu" and len(u.devices) == 3
            )
            # nvidia.com/gpu kept its registration; only gpu.shared came and went
            assert rp.state.started == (*started, "nvidia.com/gpu.shared")
            assert rp.k.registrations.empty()
