"""Per-node configs by label, against the in-process API stand-in (`make e2e` runs the same
against a real kube-apiserver)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Running, next_update, running
from tests.kubeapi import FakeApi

pytestmark = pytest.mark.integration

NODE = "gpu-node-1"
THREE = "gpus: [{uuid: GPU-a}, {uuid: GPU-b}, {uuid: GPU-c}]\n"
CONFIGS = {
    "default": "version: v1\n",
    "sliced": "version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n"
    "    resources:\n      - {name: nvidia.com/gpu, replicas: 2, devices: ['0']}\n",
}


def config_dir(directory: Path) -> Path:
    d = directory / "configs"
    d.mkdir()
    for name, text in CONFIGS.items():
        (d / name).write_text(text)
    return d


async def listed(rp: Running, resource: str, ids: list[str]) -> None:
    while [d.id for d in rp.k.devices(resource)] != ids:
        await next_update(rp.k, lambda u: u.resource == resource)


async def test_node_config_follows_the_label(short_dir: Path) -> None:
    async with FakeApi(NODE, {"nvidia.com/device-plugin.config": "sliced"}) as api, running(
        short_dir, node=THREE, config_dir=config_dir(short_dir), node_name=NODE,
        kubeconfig=api.kubeconfig(short_dir),
    ) as rp:  # fmt: skip
        # the label was read before the first registration: no default-config detour
        regs = {(await rp.k.registrations.get()).resource for _ in range(2)}
        assert regs == {"nvidia.com/gpu", "nvidia.com/gpu.shared"}
        await listed(rp, "nvidia.com/gpu.shared", ["GPU-a::0", "GPU-a::1"])
        await rp.state.wait_for(
            lambda: "node-label-watch" in [t.get_name() for t in rp.state.eternal]
        )
        started = rp.state.started
        await api.label("default")  # relabel: only the shared resource goes
        await listed(rp, "nvidia.com/gpu", ["GPU-a", "GPU-b", "GPU-c"])
        await rp.state.wait_for(lambda: rp.state.wanted == ("nvidia.com/gpu",))
        assert rp.state.started == started  # nvidia.com/gpu was not rebuilt
        await api.label("no-such-config")  # refused: the running config stays
        await rp.state.wait_for(lambda: "rejected" in rp.state.reloads)
        await api.label(None)  # no label: the default config
        await api.label("sliced")
        assert (await rp.k.registrations.get()).resource == "nvidia.com/gpu.shared"
        assert rp.k.registrations.empty()


async def test_node_config_without_api_access_keeps_the_default(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeApi(NODE) as api:
        kubeconfig = api.kubeconfig(short_dir)
    # the API is gone now: one line, the default config, and the plugin serves
    async with running(
        short_dir, node=THREE, config_dir=config_dir(short_dir), node_name=NODE,
        kubeconfig=kubeconfig, api_timeout=2.0,
    ) as rp:  # fmt: skip
        assert (await rp.k.registrations.get()).resource == "nvidia.com/gpu"
        await listed(rp, "nvidia.com/gpu", ["GPU-a", "GPU-b", "GPU-c"])
    assert f"cannot read node {NODE}" in caplog.text
    assert "Traceback" not in caplog.text
