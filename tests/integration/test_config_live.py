"""Several resources in one loop, the config file applied live, SIGHUP, against the stand-in."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from aiodp.standins.kubelet import Registration
from tests.harness import Running, next_update, running, write_atomically

pytestmark = pytest.mark.integration

NODE = """
gpus:
  - {uuid: GPU-a, numa_node: 0}
  - {uuid: GPU-b, numa_node: 0}
  - uuid: GPU-m
    numa_node: 1
    mig_devices:
      - {uuid: MIG-m-0, profile: 1g.10gb, gi: 7, ci: 0}
      - {uuid: MIG-m-1, profile: 1g.10gb, gi: 8, ci: 0}
nvlinks: [[0, 1, 4]]
"""
MIXED = "version: v1\nflags: {migStrategy: mixed}\n"
SHARED = MIXED + (
    "sharing:\n  timeSlicing:\n    renameByDefault: true\n    resources:\n"
    "      - {name: nvidia.com/gpu, replicas: 4, devices: ['0']}\n"
)


class ConfigMapDir:
    """A directory laid out like a mounted ConfigMap: config.yaml -> ..data/config.yaml."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self.n = 0
        root.mkdir()
        self._write(text)
        os.symlink(f"..{self.n}", root / "..data")
        os.symlink("..data/config.yaml", root / "config.yaml")

    def _write(self, text: str) -> None:
        self.n += 1
        (self.root / f"..{self.n}").mkdir()
        (self.root / f"..{self.n}" / "config.yaml").write_text(text)

    def swap(self, text: str) -> None:
        """The kubelet's atomic update: a new dated dir, then rename ..data_tmp over ..data."""
        self._write(text)
        os.symlink(f"..{self.n}", self.root / "..data_tmp")
        os.replace(self.root / "..data_tmp", self.root / "..data")

    @property
    def path(self) -> Path:
        return self.root / "config.yaml"


async def listed(rp: Running, resource: str, ids: list[str]) -> None:
    """Wait until the kubelet's newest list for `resource` has exactly these IDs."""

    def now() -> list[str]:
        try:
            return [d.id for d in rp.k.devices(resource)]
        except KeyError:
            return []

    while now() != ids:
        await next_update(rp.k, lambda u: u.resource == resource)


async def registrations(rp: Running, n: int) -> dict[str, Registration]:
    out = {}
    for _ in range(n):
        r = await rp.k.registrations.get()
        out[r.resource] = r
    return out


async def test_config_live_two_resources_then_a_kubelet_restart(short_dir: Path) -> None:
    cm = ConfigMapDir(short_dir / "cm", MIXED)
    async with running(short_dir, node=NODE, config_file=cm.path) as rp:
        regs = await registrations(rp, 2)
        assert set(regs) == {"nvidia.com/gpu", "nvidia.com/mig-1g.10gb"}
        assert regs["nvidia.com/mig-1g.10gb"].endpoint == "aiodp-nvidia-mig-1g-10gb.sock"
        await rp.state.wait_for(lambda: rp.state.readiness() is None)
        await listed(rp, "nvidia.com/mig-1g.10gb", ["MIG-m-0", "MIG-m-1"])
        await listed(rp, "nvidia.com/gpu", ["GPU-a", "GPU-b"])
        await rp.k.restart()
        again = await registrations(rp, 2)
        assert set(again) == set(regs)  # each resource re-registered once
        await rp.state.wait_for(lambda: rp.state.readiness() is None)
        assert rp.k.registrations.empty()
        assert rp.state.registrations == 4


async def test_config_live_swap_adds_replicas_and_leaves_other_streams(short_dir: Path) -> None:
    cm = ConfigMapDir(short_dir / "cm", MIXED)
    async with running(short_dir, node=NODE, config_file=cm.path) as rp:
        await registrations(rp, 2)
        await rp.state.wait_for(lambda: rp.state.readiness() is None)
        mig_endpoint = rp.k.endpoint("nvidia.com/mig-1g.10gb")
        cm.swap(SHARED)
        reg = await rp.k.registrations.get()
        assert reg.resource == "nvidia.com/gpu.shared"
        await listed(rp, "nvidia.com/gpu.shared", [f"GPU-a::{n}" for n in range(4)])
        await listed(rp, "nvidia.com/gpu", ["GPU-b"])  # GPU 1 stays whole
        # the MIG resource kept its server, registration and stream
        assert rp.k.endpoint("nvidia.com/mig-1g.10gb") is mig_endpoint
        assert mig_endpoint.connected
        assert rp.k.registrations.empty()
        await rp.state.wait_for(lambda: rp.state.readiness() is None)
        resp = await rp.k.allocate("nvidia.com/gpu.shared", ["GPU-a::1", "GPU-a::3"])
        assert resp.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-a"


async def test_config_live_invalid_swap_changes_nothing(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cm = ConfigMapDir(short_dir / "cm", MIXED)
    async with running(short_dir, node=NODE, config_file=cm.path) as rp:
        await registrations(rp, 2)
        await rp.state.wait_for(lambda: rp.state.readiness() is None)
        version = rp.state.live.version if rp.state.live else -1
        cm.swap("version: v1\nsharing: {timeSlicing: {resources: [{name: gpu, replicas: 1}]}}\n")
        await rp.state.wait_for(lambda: "rejected" in rp.state.reloads)
        assert "replicas: must be >= 2, got 1" in caplog.text
        assert rp.state.live is not None
        assert rp.state.live.version == version
        assert rp.k.registrations.empty()
        assert rp.state.readiness() is None
        cm.swap(SHARED)  # a valid one afterwards still applies
        assert (await rp.k.registrations.get()).resource == "nvidia.com/gpu.shared"


async def test_config_live_sighup_rediscovers(short_dir: Path) -> None:
    async with running(short_dir, node=NODE) as rp:
        await rp.k.registrations.get()
        await next_update(rp.k, lambda u: len(u.devices) == 3)
        rp.devices_file.write_text(NODE.replace("nvlinks", "  - {uuid: GPU-new}\nnvlinks"))
        os.kill(os.getpid(), signal.SIGHUP)  # the file watch may see the edit too: one new list
        update = await next_update(rp.k, lambda u: len(u.devices) == 4)
        assert update.devices[-1].id == "GPU-new"


async def test_config_live_dev_root_reload_moves_device_specs(short_dir: Path) -> None:
    """A reloaded nvidiaDevRoot changes the host paths *and* which control nodes exist."""
    roots = {}
    for name, nodes in (("a", ["nvidiactl"]), ("b", ["nvidiactl", "nvidia-uvm"])):
        (short_dir / name / "dev").mkdir(parents=True)
        for node in nodes:
            (short_dir / name / "dev" / node).write_text("")
        roots[name] = short_dir / name

    def conf(root: Path) -> str:
        return f"version: v1\nflags: {{nvidiaDevRoot: {root}, plugin: {{passDeviceSpecs: true}}}}\n"

    cm = ConfigMapDir(short_dir / "cm", conf(roots["a"]))
    async with running(short_dir, node=NODE, config_file=cm.path) as rp:
        await rp.ready.wait()
        await listed(rp, "nvidia.com/gpu", ["GPU-a", "GPU-b", "GPU-m"])
        specs = (await rp.k.allocate("nvidia.com/gpu", ["GPU-a"])).container_responses[0].devices
        assert [s.host_path for s in specs] == [
            f"{roots['a']}/dev/nvidiactl",
            f"{roots['a']}/dev/nvidia0",
        ]
        cm.swap(conf(roots["b"]))
        await rp.state.wait_for(lambda: "applied" in rp.state.reloads)
        specs = (await rp.k.allocate("nvidia.com/gpu", ["GPU-a"])).container_responses[0].devices
        assert [s.host_path for s in specs] == [
            f"{roots['b']}/dev/nvidiactl",
            f"{roots['b']}/dev/nvidia-uvm",
            f"{roots['b']}/dev/nvidia0",
        ]
        assert rp.state.registrations == 1  # the same registration serves the new settings


THREE = "gpus: [{uuid: GPU-a}, {uuid: GPU-b}, {uuid: GPU-c}]\n"
SLICED = (
    "version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n    resources:\n"
    "      - {name: nvidia.com/gpu, replicas: 2, devices: ['0']}\n"
)


async def test_config_live_device_list_change_goes_over_the_open_stream(short_dir: Path) -> None:
    """Only device lists change (which GPUs are shared, how many replicas): the new lists go
    over the open streams; no new server, registration or stream (the registrations, name and
    options, are unchanged)."""
    cm = ConfigMapDir(short_dir / "cm", SLICED)
    async with running(short_dir, node=THREE, config_file=cm.path) as rp:
        await registrations(rp, 2)
        await rp.state.wait_for(lambda: rp.state.readiness() is None)
        endpoints = {r: rp.k.endpoint(r) for r in ("nvidia.com/gpu", "nvidia.com/gpu.shared")}
        started = rp.state.started
        cm.swap(SLICED.replace("devices: ['0']", "devices: ['0', '1']"))
        await listed(rp, "nvidia.com/gpu.shared", [f"GPU-{g}::{n}" for g in "ab" for n in range(2)])
        await listed(rp, "nvidia.com/gpu", ["GPU-c"])
        cm.swap(SLICED.replace("replicas: 2", "replicas: 3"))
        await listed(rp, "nvidia.com/gpu.shared", [f"GPU-a::{n}" for n in range(3)])
        await listed(rp, "nvidia.com/gpu", ["GPU-b", "GPU-c"])
        await rp.state.wait_for(lambda: rp.state.reloads.count("applied") == 2)
        live = rp.state.live
        assert live is not None
        await rp.state.wait_for(lambda: rp.state.applied == live.version)
        assert rp.state.started == started  # no resource was rebuilt
        resp = await rp.k.allocate("nvidia.com/gpu.shared", ["GPU-a::2"])
        assert resp.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-a"
        assert rp.k.registrations.empty()
        assert rp.state.registrations == 2
        for resource, endpoint in endpoints.items():
            assert rp.k.endpoint(resource) is endpoint
            assert endpoint.connected


async def test_config_live_imex_channel_present_or_required(short_dir: Path) -> None:
    root = short_dir / "root"
    async with running(
        short_dir, nvidia_dev_root=root, imex_channel_ids=(0,), imex_required=True, expect_code=2
    ) as rp:
        assert await rp.task == 2  # the node has no channel0 and imex.required says so
    (root / "dev/nvidia-caps-imex-channels").mkdir(parents=True)
    (root / "dev/nvidia-caps-imex-channels/channel0").write_text("")
    async with running(short_dir, nvidia_dev_root=root, imex_channel_ids=(0,)) as rp:
        await rp.ready.wait()
        await next_update(rp.k, lambda u: bool(u.devices))
        gpu = rp.k.devices("nvidia.com/gpu")[0].id
        resp = (await rp.k.allocate("nvidia.com/gpu", [gpu])).container_responses[0]
        assert resp.envs["NVIDIA_IMEX_CHANNELS"] == "0"


async def test_config_live_missing_cdi_spec_is_not_ready_but_allocates(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    specs = short_dir / "cdi"
    specs.mkdir()
    config = short_dir / "config.yaml"
    config.write_text("version: v1\nflags: {plugin: {deviceListStrategy: cdi-cri}}\n")
    async with running(short_dir, node=THREE, config_file=config, cdi_spec_dirs=(specs,)) as rp:
        await rp.ready.wait()
        await next_update(rp.k, lambda u: bool(u.devices))
        problem = rp.state.readiness()
        assert problem is not None
        assert problem.startswith("CDI spec missing for nvidia.com/gpu=GPU-a")
        assert "nvidia-ctk cdi generate" in caplog.text
        resp = (await rp.k.allocate("nvidia.com/gpu", ["GPU-a"])).container_responses[0]
        assert [d.name for d in resp.cdi_devices] == ["nvidia.com/gpu=GPU-a"]  # still answers
        spec = {"kind": "nvidia.com/gpu", "devices": [{"name": f"GPU-{g}"} for g in "abc"]}
        (specs / "nvidia.json").write_text(json.dumps(spec))
        write_atomically(config, "version: v1\nflags: {plugin: {deviceListStrategy: [cdi-cri]}}\n")
        await rp.state.wait_for(lambda: rp.state.readiness() is None)  # checked on reload


async def test_config_live_unknown_keys_warn_and_the_rest_applies(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown key is a WARNING naming it, at start and on reload, and everything else in
    the file applies (NVIDIA's plugin ignores such keys; we exited 2). A bad value of a known
    key is still refused on reload."""
    cm = ConfigMapDir(short_dir / "cm", MIXED + "futureSetting: 1\n")
    async with running(short_dir, node=NODE, config_file=cm.path) as rp:
        assert set(await registrations(rp, 2)) == {"nvidia.com/gpu", "nvidia.com/mig-1g.10gb"}
        assert "unknown key futureSetting, ignored (as NVIDIA's plugin ignores it)" in caplog.text
        cm.swap(SHARED.replace("renameByDefault: true\n", "renameByDefault: true\n    knob: 3\n"))
        assert (await rp.k.registrations.get()).resource == "nvidia.com/gpu.shared"
        assert "unknown key sharing.timeSlicing.knob" in caplog.text
        cm.swap("version: v1\nflags: {migStrategy: sideways}\nknob: 1\n")
        await rp.state.wait_for(lambda: "rejected" in rp.state.reloads)
        assert "flags.migStrategy: invalid value 'sideways'" in caplog.text
        assert rp.k.registrations.empty()
