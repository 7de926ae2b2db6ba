"""Per-GPU readings on /metrics: the simulated file's `metrics:` blocks, and NVML's counters
through the fake module, while the plugin runs against the kubelet stand-in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from aiodp.config.model import Config
from aiodp.gpus.backend import DeviceBackend, GpuMetrics
from aiodp.gpus.simulated import SimulatedBackend
from aiodp.ops import podresources, statuscli
from aiodp.standins.podresources import FakePodResources
from aiodp.standins.testbed import http_get
from tests.harness import h100_node, next_update, running, scrape, write_atomically
from tests.integration.test_dra import NODE as DRA_NODE
from tests.integration.test_dra import dra_options
from tests.kubeapi import FakeApi

pytestmark = pytest.mark.integration


def _uuid(i: int) -> str:
    return f"GPU-{i:08x}-aiod-4d3e-8f00-{0x5EED0000 + i:012x}"


def gpu_labels(
    i: int, pod: str = "", namespace: str = "", container: str = "", claim: str = "",
    claim_namespace: str = "",
) -> str:  # fmt: skip
    """A GPU's labels as metrics.samples() spells them (sorted)."""
    return (
        f'GPU_I_ID="",GPU_I_PROFILE="",UUID="{_uuid(i)}",claim_name="{claim}",'
        f'claim_namespace="{claim_namespace}",container="{container}",gpu="{i}",'
        f'modelName="NVIDIA H100 80GB HBM3",namespace="{namespace}",pod="{pod}"'
    )


GPU0 = gpu_labels(0)


class Watched(SimulatedBackend):
    """The simulated backend, reporting each reading it hands out."""

    def __init__(self, path: Path, readings: asyncio.Queue[Mapping[str, GpuMetrics]]) -> None:
        super().__init__(path)
        self.readings = readings

    async def read_metrics(self) -> Mapping[str, GpuMetrics]:
        reading = await super().read_metrics()
        self.readings.put_nowait(reading)
        return reading


def watched(readings: asyncio.Queue[Mapping[str, GpuMetrics]]) -> Callable[[Config], DeviceBackend]:
    def make(config: Config) -> DeviceBackend:
        assert config.simulated_devices is not None
        return Watched(config.simulated_devices, readings)

    return make


async def reading_where(
    readings: asyncio.Queue[Mapping[str, GpuMetrics]],
    ok: Callable[[Mapping[str, GpuMetrics]], bool],
) -> None:
    while not ok(await readings.get()):
        pass


@pytest.mark.timeout(20)
async def test_gpu_metrics_follow_the_simulated_file(short_dir: Path) -> None:
    first = {
        "utilization_ratio": 0.5,
        "power_watts": 300,
        "temperature_celsius": 41,
        "energy_joules": 1000,
        "ecc_uncorrected": 0,
        "clock_events": ["sw_power_cap"],
        "nvlink_errors": {"crc_flit": 3},
    }
    readings: asyncio.Queue[Mapping[str, GpuMetrics]] = asyncio.Queue()
    async with running(
        short_dir,
        node=h100_node(metrics={0: first}),
        make_backend=watched(readings),
        metrics_address="127.0.0.1:0",
        device_metrics_interval=0.05,
    ) as rp:
        await rp.ready.wait()
        await reading_where(readings, lambda r: bool(r))
        got = await scrape(rp)
        assert got[f"aiodp_gpu_utilization_ratio{{{GPU0}}}"] == 0.5
        assert got[f"aiodp_gpu_power_watts{{{GPU0}}}"] == 300
        assert got[f"aiodp_gpu_temperature_celsius{{{GPU0}}}"] == 41
        assert got[f"aiodp_gpu_energy_joules_total{{{GPU0}}}"] == 1000
        assert got[f'aiodp_gpu_ecc_errors_total{{{GPU0},type="uncorrected"}}'] == 0
        assert got[f'aiodp_gpu_clock_event_active{{{GPU0},reason="sw_power_cap"}}'] == 1
        assert got[f'aiodp_gpu_clock_event_active{{{GPU0},reason="gpu_idle"}}'] == 0
        assert got[f'aiodp_gpu_nvlink_errors_total{{{GPU0},type="crc_flit"}}'] == 3
        # what the file does not state is left out, not reported as 0
        assert not any(k.startswith("aiodp_gpu_sm_clock_hertz") for k in got)
        assert not any('gpu="1"' in k for k in got if k.startswith("aiodp_gpu_"))

        write_atomically(rp.devices_file, h100_node(metrics={0: {**first, "power_watts": 450}}))
        await reading_where(readings, lambda r: r.get(_uuid(0), GpuMetrics()).power_watts == 450)
        got = await scrape(rp)
        assert got[f"aiodp_gpu_power_watts{{{GPU0}}}"] == 450


@pytest.mark.timeout(20)
async def test_gpu_metrics_off_when_the_interval_is_zero(short_dir: Path) -> None:
    readings: asyncio.Queue[Mapping[str, GpuMetrics]] = asyncio.Queue()
    async with running(
        short_dir,
        node=h100_node(metrics={0: {"power_watts": 300}}),
        make_backend=watched(readings),
        metrics_address="127.0.0.1:0",
        device_metrics_interval=0,
    ) as rp:
        await rp.ready.wait()
        got = await scrape(rp)
        assert readings.empty()
        assert not any(k.startswith("aiodp_gpu_power_watts") for k in got)
        assert rp.state.endpoint is not None
        assert "device-metrics" not in [t.get_name() for t in asyncio.all_tasks()]


@pytest.mark.timeout(20)
async def test_gpu_metrics_name_the_pod_on_each_gpu(short_dir: Path) -> None:
    """Simulated GPUs with metrics, an Allocate through the kubelet stand-in, pod-resources
    naming that pod: /metrics and /status show the right pod on the right GPU, the pod's GPU
    failing shows in aiodp_pod_unhealthy_devices, and the pod's series go when it ends."""
    node = {i: {"power_watts": 100 + i} for i in range(8)}
    readings: asyncio.Queue[Mapping[str, GpuMetrics]] = asyncio.Queue()
    async with (
        FakePodResources(short_dir / "pod-resources" / "kubelet.sock") as kubelet_pods,
        running(
            short_dir,
            node=h100_node(metrics=node),
            make_backend=watched(readings),
            metrics_address="127.0.0.1:0",
            device_metrics_interval=0.05,
        ) as rp,
    ):
        await rp.ready.wait()
        gpu = rp.k.devices("nvidia.com/gpu")[3].id
        await rp.k.allocate("nvidia.com/gpu", [gpu])
        kubelet_pods.assign("ml", "train-0", "trainer", "nvidia.com/gpu", [gpu])
        kubelet_pods.assign("other", "x", "y", "example.com/fpga", ["fpga0"])  # not ours
        await kubelet_pods.answered()
        got = await scrape(rp)
        held = gpu_labels(3, pod="train-0", namespace="ml", container="trainer")
        assert got[f"aiodp_gpu_power_watts{{{held}}}"] == 103
        assert got[f"aiodp_gpu_power_watts{{{gpu_labels(2)}}}"] == 102  # a free GPU
        pod = 'container="trainer",namespace="ml",pod="train-0",resource="nvidia.com/gpu"'
        assert got[f"aiodp_pod_devices{{{pod}}}"] == 1
        assert got[f"aiodp_pod_unhealthy_devices{{{pod}}}"] == 0
        assert not any("fpga" in k for k in got)
        doc = json.loads(await http_get(rp.address, "/status"))
        pods = {d["id"]: d["pod"] for d in doc["devices"]}
        assert pods[gpu] == "ml/train-0/trainer"
        assert sum(1 for p in pods.values() if p) == 1
        live = {d["id"]: d["metrics"] for d in doc["devices"]}
        assert live[gpu] == {"power_watts": 103}  # what the file states, nothing invented
        row = next(r for r in statuscli.table(doc).splitlines() if r.startswith(gpu))
        assert "103W" in row
        assert row.endswith("ml/train-0/trainer")

        hot = {**node, 3: {"power_watts": 350}}
        write_atomically(rp.devices_file, h100_node({3: "XID 79 (simulated)"}, metrics=hot))
        await next_update(rp.k, lambda u: any(d.health == "Unhealthy" for d in u.devices))
        await reading_where(readings, lambda r: r.get(_uuid(3), GpuMetrics()).power_watts == 350)
        got = await scrape(rp)
        assert got[f"aiodp_pod_unhealthy_devices{{{pod}}}"] == 1  # the page an operator needs
        assert got[f"aiodp_gpu_power_watts{{{held}}}"] == 350  # values move with the file

        kubelet_pods.release("ml", "train-0")
        await kubelet_pods.answered()
        got = await scrape(rp)
        assert not any("train-0" in k for k in got)
        assert got[f"aiodp_gpu_power_watts{{{gpu_labels(3)}}}"] == 350
        assert kubelet_pods.calls >= 4


@pytest.mark.timeout(20)
async def test_gpu_metrics_of_a_widely_shared_gpu_are_reported_once(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(podresources, "MAX_LABELLED_HOLDERS", 1)
    async with (
        FakePodResources(short_dir / "pod-resources" / "kubelet.sock") as kubelet_pods,
        running(
            short_dir,
            node=h100_node(metrics={3: {"power_watts": 103}}),
            metrics_address="127.0.0.1:0",
            device_metrics_interval=0.05,
        ) as rp,
    ):
        await rp.ready.wait()
        gpu = rp.k.devices("nvidia.com/gpu")[3].id
        for pod in ("a", "b"):
            kubelet_pods.assign("ml", pod, "c", "nvidia.com/gpu", [gpu])
        await kubelet_pods.answered()
        got = await scrape(rp)
        power = [k for k in got if k.startswith("aiodp_gpu_power_watts{")]
        assert power == [f"aiodp_gpu_power_watts{{{gpu_labels(3)}}}"]  # once, unlabelled
        for pod in ("a", "b"):
            key = f'container="c",namespace="ml",pod="{pod}",resource="nvidia.com/gpu"'
            assert got[f"aiodp_pod_devices{{{key}}}"] == 1  # every holder still named


MIG_NODE = """\
gpus:
  - uuid: GPU-m
    name: NVIDIA H100 80GB HBM3
    metrics: {power_watts: 200, memory_total_bytes: 85520809984}
    mig_devices:
      - {uuid: MIG-a, profile: 1g.10gb, gi: 7, ci: 0, metrics: {memory_used_bytes: 1048576}}
      - {uuid: MIG-b, profile: 3g.40gb, gi: 2, ci: 0}
"""


@pytest.mark.timeout(20)
async def test_gpu_metrics_per_mig_device_name_its_pod(short_dir: Path) -> None:
    async with (
        FakePodResources(short_dir / "pod-resources" / "kubelet.sock") as kubelet_pods,
        running(
            short_dir,
            node=MIG_NODE,
            mig_strategy="mixed",
            metrics_address="127.0.0.1:0",
            device_metrics_interval=0.05,
        ) as rp,
    ):
        await rp.ready.wait()
        kubelet_pods.assign("ml", "small", "c", "nvidia.com/mig-1g.10gb", ["MIG-a"])
        await kubelet_pods.answered()
        got = await scrape(rp)
    model = 'modelName="NVIDIA H100 80GB HBM3"'
    held = 'claim_name="",claim_namespace="",container="c",gpu="0",' + model
    held += ',namespace="ml",pod="small"'
    mig = f'GPU_I_ID="7",GPU_I_PROFILE="1g.10gb",UUID="GPU-m",{held}'
    assert got[f"aiodp_gpu_memory_used_bytes{{{mig}}}"] == 1048576
    # the GPU itself: held through its MIG device
    whole = f'GPU_I_ID="",GPU_I_PROFILE="",UUID="GPU-m",{held}'
    assert got[f"aiodp_gpu_power_watts{{{whole}}}"] == 200
    # MIG-b states nothing: no series of its own
    assert not any('GPU_I_PROFILE="3g.40gb"' in k for k in got)


@pytest.mark.timeout(20)
async def test_gpu_metrics_name_the_claim_of_a_dra_gpu(short_dir: Path) -> None:
    """A GPU served through DRA: pod-resources' dynamic_resources name the pod and the claim
    on its series, and /status and `aiodp status` show the claim with its pod."""
    node = {i: {"power_watts": 100 + i} for i in range(8)}
    async with (
        FakeApi(DRA_NODE) as api,
        FakePodResources(short_dir / "pod-resources" / "kubelet.sock") as kubelet_pods,
        running(
            short_dir,
            node=h100_node(metrics=node),
            metrics_address="127.0.0.1:0",
            device_metrics_interval=0.05,
            **dra_options(short_dir, api),
        ) as rp,
    ):
        await rp.state.wait_for(lambda: rp.state.endpoint is not None)
        kubelet_pods.claim("ml", "train", "main", "train-gpu", "gpu.aiodp.io", DRA_NODE, ["gpu-5"])
        kubelet_pods.claim("ml", "x", "y", "other", "fpga.example.com", DRA_NODE, ["gpu-6"])
        await kubelet_pods.answered()
        got = await scrape(rp)
        held = gpu_labels(5, pod="train", namespace="ml", container="main", claim="train-gpu",
                          claim_namespace="ml")  # fmt: skip
        assert got[f"aiodp_gpu_power_watts{{{held}}}"] == 105
        assert got[f"aiodp_gpu_power_watts{{{gpu_labels(6)}}}"] == 106  # not our driver's
        doc = json.loads(await http_get(rp.address, "/status"))
        assert doc["claims"] == [
            {"claim": "ml/train-gpu", "pod": "ml/train/main", "device": "gpu-5"}
        ]
        pods = {d["id"]: d["pod"] for d in doc["devices"]}
        assert pods[_uuid(5)] == "ml/train/main"
        table = statuscli.table(doc)
        assert "ml/train-gpu" in table
        assert table.splitlines()[table.splitlines().index(next(
            r for r in table.splitlines() if r.startswith("CLAIM")
        )) + 1].split() == ["ml/train-gpu", "gpu-5", "ml/train/main"]  # fmt: skip
