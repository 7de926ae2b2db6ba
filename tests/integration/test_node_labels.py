"""GPU Feature Discovery's labels from the running plugin, against the in-process API stand-in
(`make e2e` runs the same against a real kube-apiserver, with and without NFD's CRD)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from aiodp.gpus import labels
from aiodp.standins.testbed import gpu_uuid
from tests.harness import Running, h100_node, running, write_atomically
from tests.kubeapi import FakeApi

pytestmark = pytest.mark.integration

NODE = "gpu-node-1"
THEIRS = {
    "kubernetes.io/hostname": NODE,
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.deploy.device-plugin": "true",
    "nvidia.com/device-plugin.config": "default",
}


def options(api: FakeApi, short_dir: Path, **more: Any) -> dict[str, Any]:
    machine = short_dir / "product_name"
    machine.write_text("NVIDIA DGX H100\n")
    return {"node_name": NODE, "kubeconfig": api.kubeconfig(short_dir), "gfd": True,
            "machine_type_file": machine, "node_signals": False, **more}  # fmt: skip


def ours(api: FakeApi) -> dict[str, str]:
    return {k: v for k, v in api.labels.items() if labels.OWNED.match(k)}


async def edit(rp: Running, api: FakeApi, text: str) -> None:
    writes = api.label_writes
    write_atomically(rp.devices_file, text)
    await api.wait_label_writes(writes + 1)


@pytest.mark.timeout(30)
async def test_node_labels_patched_on_the_node_without_nfd(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        FakeApi(NODE, labels=THEIRS) as api,
        running(short_dir, **options(api, short_dir)) as rp,
    ):
        await api.wait_label_writes(1)
        got = ours(api)
        assert got["nvidia.com/gpu.count"] == "8"
        assert got["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert got["nvidia.com/gpu.machine"] == "NVIDIA-DGX-H100"
        assert {k: api.labels[k] for k in THEIRS} == THEIRS  # everyone else's stay
        assert "NodeFeature API is not served" in caplog.text
        # a GPU gone from the node: the count drops, once
        text = h100_node()
        await edit(rp, api, text[: text.index(f"  - uuid: {gpu_uuid(7)}")] + "nvlinks: []\n")
        assert ours(api)["nvidia.com/gpu.count"] == "7"
        writes = api.label_writes
        rp.state.changed()
        assert api.label_writes == writes  # nothing new: nothing written
    assert {k: api.labels[k] for k in THEIRS} == THEIRS


@pytest.mark.timeout(30)
async def test_node_labels_follow_a_config_reload_and_remove_what_no_longer_applies(
    short_dir: Path,
) -> None:
    config = short_dir / "config.yaml"
    config.write_text("version: v1\nflags: {migStrategy: mixed}\n")
    async with (
        FakeApi(NODE, labels=THEIRS) as api,
        running(short_dir, **options(api, short_dir, config_file=config)) as rp,
    ):
        await api.wait_label_writes(1)
        assert ours(api)["nvidia.com/mig.strategy"] == "mixed"
        writes = api.label_writes
        write_atomically(
            config,
            "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
            "    - {name: nvidia.com/gpu, replicas: 4}\n",
        )
        await api.wait_label_writes(writes + 1)
        got = ours(api)
        assert "nvidia.com/mig.strategy" not in got  # ours, no longer true: removed
        assert got["nvidia.com/gpu.replicas"] == "4"
        assert got["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3-SHARED"
        assert got["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
        assert rp.state.live is not None
    assert api.labels["nvidia.com/device-plugin.config"] == "default"


@pytest.mark.timeout(30)
async def test_node_labels_go_to_a_node_feature_where_nfd_serves_it(short_dir: Path) -> None:
    async with FakeApi(NODE, labels=THEIRS) as api:
        api.node_features = {}
        opts = options(api, short_dir, namespace="gpu-operator")
        async with running(short_dir, **opts) as rp:
            await api.wait_label_writes(1)
            (feature,) = api.node_features.values()
            assert feature["metadata"]["name"] == f"nvidia-features-for-{NODE}"
            assert feature["metadata"]["namespace"] == "gpu-operator"
            assert feature["metadata"]["labels"] == {"nfd.node.kubernetes.io/node-name": NODE}
            assert feature["spec"]["labels"]["nvidia.com/gpu.count"] == "8"
            assert ours(api) == {}  # NFD puts them on the node, not us
            text = h100_node()
            await edit(rp, api, text[: text.index(f"  - uuid: {gpu_uuid(7)}")] + "nvlinks: []\n")
            (feature,) = api.node_features.values()
            assert feature["spec"]["labels"]["nvidia.com/gpu.count"] == "7"
        assert api.label_writes == 2


@pytest.mark.timeout(30)
async def test_node_labels_without_api_access_are_one_line(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeApi(NODE) as api:
        api.deny = True
        async with running(short_dir, **options(api, short_dir)) as rp:
            await rp.ready.wait()
            await api.wait_requests(lambda r: r.startswith("PATCH /api/v1/nodes/"))
        lines = [r for r in caplog.records if "cannot write node" in r.getMessage()]
        assert len(lines) == 1


@pytest.mark.timeout(30)
async def test_node_labels_a_lost_gpu_drops_the_count(short_dir: Path) -> None:
    """A GPU gone from the bus (its health 'GPU is lost') leaves the count, as GFD no longer
    sees it; back, it counts again. A health change that is not a loss writes nothing."""
    async with (
        FakeApi(NODE, labels=THEIRS) as api,
        running(short_dir, **options(api, short_dir)) as rp,
    ):
        await api.wait_label_writes(1)
        await edit(rp, api, h100_node({7: "GPU is lost"}))
        assert ours(api)["nvidia.com/gpu.count"] == "7"
        await edit(rp, api, h100_node())
        assert ours(api)["nvidia.com/gpu.count"] == "8"
        writes = api.label_writes
        write_atomically(rp.devices_file, h100_node({3: "XID 79 (simulated)"}))
        await rp.state.wait_for(
            lambda: any(d["health"] == "Unhealthy" for d in rp.state.snapshot()["devices"])
        )
        await edit(rp, api, h100_node({6: "GPU is lost"}))  # the next write is the loss's
        assert api.label_writes == writes + 1
        assert ours(api)["nvidia.com/gpu.count"] == "7"
