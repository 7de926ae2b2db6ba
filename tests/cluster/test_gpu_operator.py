"""Under the GPU Operator's shape: its device-plugin DaemonSet (manifests/, written from the
Operator's assets) with our image swapped in. The entrypoint's `exec nvidia-device-plugin`,
the config-manager init container and sidecar, PASS_DEVICE_SPECS=true and
DEVICE_LIST_STRATEGY=envvar; a GPU pod runs under it, and a relabel reaches the plugin by the
sidecar's SIGHUP (to the process whose argv[0] is nvidia-device-plugin)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import aiodp
from tests.cluster import chart
from tests.cluster.chart import UUIDS
from tests.cluster.conftest import report
from tests.cluster.node import NODE, Cluster, wait

pytestmark = pytest.mark.timeout(300)

MANIFEST = Path(__file__).parent / "manifests" / "gpu-operator-device-plugin.yaml"
NS = "gpu-operator"
IMAGE = f"ghcr.io/aiodp/aiodp:{aiodp.__version__}"
LABEL = "nvidia.com/device-plugin.config"


def _objects() -> str:
    return MANIFEST.read_text().replace("image: IMAGE", f"image: {IMAGE}")


APPLIED: list[float] = []


@pytest.fixture(scope="module")
def operand(cluster: Cluster) -> Iterator[None]:
    chart.write_gpus()
    Path("/run/nvidia/mps/shm").mkdir(parents=True, exist_ok=True)  # the Operator's MPS shm
    cluster.kubectl("label", "node", NODE, "nvidia.com/gpu.deploy.device-plugin=true")
    APPLIED.append(time.monotonic())
    cluster.apply(_objects())
    yield
    docs = [d for d in yaml.safe_load_all(_objects()) if d and d["kind"] != "Namespace"]
    cluster.kubectl("delete", "--wait=true", "-f", "-", input=yaml.safe_dump_all(docs), timeout=120)
    cluster.kubectl("label", "node", NODE, "nvidia.com/gpu.deploy.device-plugin-", f"{LABEL}-")
    wait(lambda: not cluster.get("pods", ns=NS)["items"], "the operand's pods to go", 90)


def _pod(cluster: Cluster) -> dict[str, object] | None:
    pods = cluster.get("pods", ns=NS)["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    return running[0] if running else None


def _log(cluster: Cluster, container: str) -> str:
    pod = wait(lambda: _pod(cluster), "the operand's pod", 60)
    name = pod["metadata"]["name"]  # type: ignore[index]
    return cluster.kubectl("logs", "-n", NS, name, "-c", container, "--tail=-1")


def test_operator_shape_serves_gpus_and_reloads_on_the_sidecars_sighup(
    cluster: Cluster, operand: None
) -> None:
    wait(lambda: cluster.get("pods", ns=NS)["items"], "the DaemonSet controller's pod", 120)
    created = time.monotonic() - APPLIED[0]
    chart.allocatable_is(cluster, 8, timeout=120)
    up = time.monotonic() - APPLIED[0]
    init = cluster.kubectl("logs", "-n", NS, _pod(cluster)["metadata"]["name"],  # type: ignore[index]
                           "-c", "config-manager-init")  # fmt: skip
    assert "config is now default" in init, init
    plugin_log = _log(cluster, "nvidia-device-plugin")
    assert "Starting nvidia-device-plugin" in plugin_log
    assert "registered nvidia.com/gpu with the kubelet" in plugin_log
    cluster.apply([chart.gpu_pod("under-operator", 1)])
    chart.running(cluster, "under-operator")
    (got,) = chart.visible(cluster, "under-operator")
    assert got in UUIDS
    relabel = time.monotonic()
    cluster.kubectl("label", "node", NODE, f"{LABEL}=ts4", "--overwrite")
    chart.allocatable_is(cluster, 32, timeout=120)
    delay = time.monotonic() - relabel
    sidecar = _log(cluster, "config-manager")
    assert "config is now ts4" in sidecar, sidecar
    assert "sent SIGHUP to nvidia-device-plugin" in sidecar, sidecar
    assert "SIGHUP: rediscovering devices and reloading the config" in _log(
        cluster, "nvidia-device-plugin"
    )
    pod = _pod(cluster)
    assert pod is not None
    assert all(c["restartCount"] == 0 for c in pod["status"]["containerStatuses"])  # type: ignore[index]
    chart.delete_pods(cluster, "under-operator")
    report(f"GPU Operator shape: pod created {created:.1f} s and allocatable 8 {up:.1f} s after "
           "apply; a GPU pod ran under it; "
           "label config=ts4 -> config-manager symlink + SIGHUP -> capacity 32 in "
           f"{delay:.1f} s")  # fmt: skip
