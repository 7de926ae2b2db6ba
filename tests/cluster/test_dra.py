"""DRA on the real node: the chart with `dra.enabled=true` and two GPUs for DRA; a pod with
the README's H100 ResourceClaimTemplate placed by the real scheduler, prepared by the
kubelet's DRA manager through us, its GPU handed over by the CDI spec we wrote (containerd 2
with CDI on); deleting the pod unprepares the claim and removes the spec."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import chart
from tests.cluster.chart import BASE, UUIDS
from tests.cluster.conftest import report
from tests.cluster.node import Cluster, wait

pytestmark = pytest.mark.timeout(300)

CDI_DIR = Path("/var/run/cdi")
DRIVER = "gpu.aiodp.io"
TEMPLATE = {
    "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
    "metadata": {"name": "one-h100-80g", "namespace": "default"},
    "spec": {"spec": {"devices": {"requests": [{
        "name": "gpu",
        "exactly": {
            "deviceClassName": DRIVER,
            "selectors": [{"cel": {"expression":
                f'device.attributes["{DRIVER}"].productName.startsWith("NVIDIA H100") && '
                f'device.capacity["{DRIVER}"].memory.compareTo(quantity("80G")) >= 0'}}],
        },
    }]}}},
}  # fmt: skip


@pytest.fixture(scope="module")
def dra(cluster: Cluster) -> Iterator[dict[str, Any]]:
    chart.write_gpus()
    values = {**BASE, "dra": {"enabled": True, "devices": [6, 7]}}
    chart.install(cluster, values)
    yield values
    chart.uninstall(cluster, values)


def _pod() -> dict[str, Any]:
    pod = chart.gpu_pod("dra-h100", 0)
    spec = pod["spec"]
    spec["resourceClaims"] = [{"name": "gpu", "resourceClaimTemplateName": "one-h100-80g"}]
    spec["containers"][0]["resources"] = {"claims": [{"name": "gpu"}]}
    return pod


def _prepared_at(cluster: Cluster) -> float | None:
    """When the plugin logged the claim prepared (its log's timestamp, as epoch seconds)."""
    log = cluster.kubectl("logs", "-n", chart.NAMESPACE, "-l", chart.SELECTOR, "--tail=-1")
    line = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) INFO\s+aiodp\.dra\.prepared: prepared claim"
    m = re.search(line, log, re.M)
    if not m:
        return None
    stamp = time.strptime(m.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S")
    return time.mktime(stamp) - time.timezone + int(m.group(1).split(",")[1]) / 1000


def test_dra_claim_runs_through_the_scheduler_kubelet_and_cdi(
    cluster: Cluster, dra: dict[str, Any]
) -> None:
    chart.ready_plugin(cluster)
    chart.allocatable_is(cluster, 6)  # two of the eight are DRA's now

    def published() -> list[dict[str, Any]] | None:
        items = cluster.get("resourceslices")["items"]
        devs = [d for s in items if s["spec"]["driver"] == DRIVER for d in s["spec"]["devices"]]
        return devs if len(devs) == 2 else None

    devs = wait(published, "a ResourceSlice with the two DRA GPUs", 60)
    uuids = {d["attributes"]["uuid"]["string"] for d in devs}
    assert uuids == {UUIDS[6], UUIDS[7]}, devs
    cluster.apply([TEMPLATE])
    start = time.time()
    cluster.apply([_pod()])
    pod = chart.running(cluster, "dra-h100", timeout=120)
    took = time.time() - start
    prepared = wait(lambda: _prepared_at(cluster), "the plugin's 'prepared claim' line", 30)
    got = chart.visible(cluster, "dra-h100")
    assert len(got) == 1, got
    assert got[0] in uuids, got
    (claim_status,) = pod["status"]["resourceClaimStatuses"]
    claim = cluster.get("resourceclaim", claim_status["resourceClaimName"], ns="default")
    uid = claim["metadata"]["uid"]
    spec = CDI_DIR / f"aiodp-claim_{uid}.json"
    assert spec.is_file(), sorted(p.name for p in CDI_DIR.glob("*"))
    assert f"NVIDIA_VISIBLE_DEVICES={got[0]}" in spec.read_text()  # what the runtime injected
    started = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    running_at = time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    chart.delete_pods(cluster, "dra-h100")
    wait(lambda: not spec.exists(), "the claim's CDI spec to be removed", 60)
    wait(lambda: cluster.get("resourceclaim", claim["metadata"]["name"], ns="default", check=False)
         is None, "the template's claim to be deleted", 60)  # fmt: skip
    log = cluster.kubectl("logs", "-n", chart.NAMESPACE, "-l", chart.SELECTOR, "--tail=-1")
    assert f"unprepared claim default/{claim['metadata']['name']}" in log, log[-2000:]
    assert chart.allocatable_is(cluster, 6) >= 0
    report(f"DRA: pod with the README's H100 claim Running {took:.1f} s after apply "
           f"(claim prepared -> container started {max(0.0, running_at - prepared):.1f} s, "
           f"startedAt has 1 s resolution); GPU {UUIDS.index(got[0])} by our CDI spec; "
           "nvidia.com/gpu 6; pod deleted: claim unprepared, spec removed")  # fmt: skip
