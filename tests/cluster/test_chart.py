"""The chart and image on a real node, in the order an operator meets them: install, pods get
GPUs, the node fills, the kubelet and the plugin restart, a GPU fails and recovers, the config
changes live and per node, metrics and status, an upgrade. One install for the module; each
test leaves the node as it found it (8 healthy GPUs, no workload but its own)."""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import helm_python
import pytest

from tests.cluster import chart
from tests.cluster.chart import BASE, NAMESPACE, UUIDS
from tests.cluster.conftest import report
from tests.cluster.node import NODE, Cluster, wait

pytestmark = pytest.mark.timeout(300)

TIME_SLICED = (
    "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
    "      - name: nvidia.com/gpu\n        replicas: {n}\n"
)


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Iterator[dict[str, Any]]:
    chart.write_gpus()
    values = {**BASE, "config": {"map": {"default": "version: v1\n"}}}
    chart.install(cluster, values)
    yield values
    chart.uninstall(cluster, values)


def _ready_since(pod: dict[str, Any]) -> datetime.datetime:
    (ready,) = [c for c in pod["status"]["conditions"] if c["type"] == "Ready"]
    return datetime.datetime.fromisoformat(ready["lastTransitionTime"].replace("Z", "+00:00"))


def _registered_at(cluster: Cluster) -> datetime.datetime:
    """When the kubelet logged the first nvidia.com/gpu registration (klog's header)."""
    text = cluster.procs["kubelet"].log.read_text(errors="replace")
    said = (
        '"Got registration request from device plugin with resource" resourceName="nvidia.com/gpu"'
    )
    line = next(ln for ln in text.splitlines() if said in ln)
    m = re.match(r"I(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+)", line)
    assert m, line
    month, day, h, mi, s, us = (int(x) for x in m.groups())
    year = datetime.datetime.now(datetime.UTC).year
    return datetime.datetime(
        year, month, day, h, mi, s, int(str(us)[:6].ljust(6, "0")), datetime.UTC
    )


def test_rollout_ready_after_registration_with_8_gpus(
    cluster: Cluster, installed: dict[str, Any]
) -> None:
    start = time.monotonic()
    pod = chart.ready_plugin(cluster)
    rollout = time.monotonic() - start
    ds = cluster.get("daemonset", ns=NAMESPACE)["items"][0]
    assert ds["status"]["numberReady"] == 1
    # readiness follows the kubelet's registration: Ready (second resolution) is not before it
    assert _ready_since(pod) >= _registered_at(cluster).replace(microsecond=0)
    chart.allocatable_is(cluster, 8)
    assert cluster.capacity() == 8
    report(
        f"rollout: DaemonSet Ready {rollout:.1f} s after apply; "
        "capacity and allocatable nvidia.com/gpu 8"
    )


PREFERRED_OK = (
    'aiodp_requests_total{code="OK",method="GetPreferredAllocation",resource="nvidia.com/gpu"}'
)


def _preferred_calls(cluster: Cluster) -> int:
    """GetPreferredAllocation calls answered OK, from the plugin's /metrics."""
    for line in _scrape(cluster).splitlines():
        if line.startswith(PREFERRED_OK + " "):
            return int(float(line.split()[-1]))
    return 0


def test_whole_gpus_get_the_preferred_pair(cluster: Cluster, installed: dict[str, Any]) -> None:
    """With GPUs 0-2 taken, the kubelet's own pick of 2 from 3-7 (sorted) would be 3 and 4,
    on two NUMA nodes with no NVLink between them; the preferred allocation, which the
    kubelet asks for and uses, is an NVLink-4 pair of the 4-7 island."""
    calls = _preferred_calls(cluster)
    cluster.apply([chart.gpu_pod("three", 3)])
    chart.running(cluster, "three")
    taken = sorted(UUIDS.index(u) for u in chart.visible(cluster, "three"))
    assert taken == [0, 1, 2], taken  # the preferred three: one NVLink island
    start = time.monotonic()
    cluster.apply([chart.gpu_pod("two", 2)])
    chart.running(cluster, "two")
    took = time.monotonic() - start
    got = chart.visible(cluster, "two")
    assert len(got) == 2, got
    assert set(got) <= set(UUIDS), got
    a, b = sorted(UUIDS.index(u) for u in got)
    assert 4 <= a < b <= 7, got
    assert _preferred_calls(cluster) >= calls + 2  # asked for each pod
    chart.delete_pods(cluster, "three")
    chart.allocatable_is(cluster, 8)  # allocatable is what the node has, not what is free
    report(
        f"whole GPUs: pod with 2 GPUs Running {took:.1f} s after apply; with 0-2 taken it got "
        f"GPUs {a} and {b}, the preferred NVLink pair (the kubelet's own pick: 3 and 4)"
    )


def test_busy_node_leaves_the_pod_pending(cluster: Cluster, installed: dict[str, Any]) -> None:
    cluster.apply([chart.gpu_pod("too-many", 7)])

    def reason() -> str | None:
        pod = cluster.get("pod", "too-many", ns="default")
        cond = [c for c in pod["status"].get("conditions", []) if c["type"] == "PodScheduled"]
        return cond[0].get("message") if cond and cond[0]["status"] == "False" else None

    message = wait(reason, "the scheduler's reason")
    assert "Insufficient nvidia.com/gpu" in message, message
    assert cluster.get("pod", "too-many", ns="default")["status"]["phase"] == "Pending"
    chart.delete_pods(cluster, "too-many")
    report(f"busy node: 7 GPUs asked with 6 free stays Pending: {message!r}")


def _scrape(cluster: Cluster, path: str = "/metrics") -> str:
    pod = chart.ready_plugin(cluster)
    with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080{path}", timeout=10) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def test_operators_view_metrics_by_pod_ip_and_status_by_exec(
    cluster: Cluster, installed: dict[str, Any]
) -> None:
    got = chart.visible(cluster, "two")

    def attributed() -> str | None:
        text = _scrape(cluster)
        lines = [
            ln for ln in text.splitlines() if ln.startswith("aiodp_gpu_") and 'pod="two"' in ln
        ]
        return text if lines else None

    text = wait(attributed, "GPU series labelled with the workload pod", 60)
    for uuid in got:
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith("aiodp_gpu_") and uuid in ln and 'pod="two"' in ln
        )
        assert 'namespace="default"' in line, line
        assert 'container="cuda"' in line, line
    pod = chart.ready_plugin(cluster)
    status = cluster.kubectl(
        "exec",
        "-n",
        NAMESPACE,
        pod["metadata"]["name"],
        "--",
        "python",
        "-m",
        "aiodp",
        "status",
        "-o",
        "json",
    )
    doc = json.loads(status)
    (gpu,) = [r for r in doc["resources"] if r["name"] == "nvidia.com/gpu"]
    assert gpu["registered"] is True, doc
    table = cluster.kubectl(
        "exec", "-n", NAMESPACE, pod["metadata"]["name"], "--", "python", "-m", "aiodp", "status"
    )
    for uuid in UUIDS:
        assert uuid in table, table
    assert "default/two/cuda" in table, table
    report(
        "operator's view: /metrics by pod IP shows GPU series with pod/namespace/container; "
        "`kubectl exec ... aiodp status` shows nvidia.com/gpu registered"
    )


def test_kubelet_restart_keeps_pods_and_re_registers(
    cluster: Cluster, installed: dict[str, Any]
) -> None:
    before = cluster.get("pod", "two", ns="default")["status"]["containerStatuses"][0]
    registrations = chart.kubelet_registrations(cluster)
    cluster.procs["kubelet"].stop()
    start = time.monotonic()
    cluster.start_kubelet()
    wait(
        lambda: chart.kubelet_registrations(cluster) > registrations,
        "the plugin to re-register",
        60,
    )
    registered = time.monotonic() - start
    wait(lambda: chart.ready_with(cluster, 8), "the node Ready with allocatable 8", 90)
    again = time.monotonic() - start
    after = cluster.get("pod", "two", ns="default")["status"]["containerStatuses"][0]
    assert after["containerID"] == before["containerID"]
    assert after["restartCount"] == 0
    assert after["state"].get("running"), after
    cluster.apply([chart.gpu_pod("after-restart", 1)])
    chart.running(cluster, "after-restart")
    assert len(chart.visible(cluster, "after-restart")) == 1
    chart.delete_pods(cluster, "after-restart")
    report(
        f"kubelet restart: re-registered {registered:.1f} s after the kubelet started, "
        f"node Ready with allocatable 8 after {again:.1f} s; the running pod kept its container"
    )


def test_plugin_pod_deleted_is_recreated_without_disturbing_pods(
    cluster: Cluster, installed: dict[str, Any]
) -> None:
    old = chart.ready_plugin(cluster)
    before = cluster.get("pod", "two", ns="default")["status"]["containerStatuses"][0]
    registrations = chart.kubelet_registrations(cluster)
    start = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, old["metadata"]["name"], "--wait=false")
    new = chart.replaced(cluster, old)
    wait(
        lambda: chart.kubelet_registrations(cluster) > registrations, "the new pod to register", 60
    )
    took = time.monotonic() - start
    chart.allocatable_is(cluster, 8)
    after = cluster.get("pod", "two", ns="default")["status"]["containerStatuses"][0]
    assert after["containerID"] == before["containerID"]
    assert after["restartCount"] == 0
    assert new["metadata"]["name"] != old["metadata"]["name"]
    report(
        f"plugin pod deleted: recreated, Ready and registered in {took:.1f} s; "
        "the running pod untouched"
    )


def _condition(cluster: Cluster) -> dict[str, Any] | None:
    conds = [c for c in cluster.node()["status"]["conditions"] if c["type"] == "GPUHealthy"]
    return conds[0] if conds else None


def test_health_xid_takes_a_gpu_away_and_it_recovers(
    cluster: Cluster, installed: dict[str, Any]
) -> None:
    busy = chart.visible(cluster, "two")
    victim = next(i for i in range(7, -1, -1) if UUIDS[i] not in busy)
    chart.write_gpus(xids={victim: [79]})
    start = time.monotonic()
    chart.allocatable_is(cluster, 7)
    down = time.monotonic() - start
    cond = wait(
        lambda: (c := _condition(cluster)) and c["status"] == "False" and c, "GPUHealthy=False", 60
    )
    assert cond["reason"] == "XidCriticalError", cond
    assert UUIDS[victim] in cond["message"], cond

    def event() -> dict[str, Any] | None:
        items = cluster.get("events", ns="default")["items"]
        hits = [
            e
            for e in items
            if e.get("reason") == "XIDError" and UUIDS[victim] in e.get("message", "")
        ]
        return hits[0] if hits else None

    ev = wait(event, "the XIDError Event", 60)
    assert ev["type"] == "Warning", ev
    assert ev["involvedObject"]["kind"] == "Node", ev
    chart.allocatable_is(cluster, 8, timeout=90)  # the file says Healthy: recovery after 8 s
    up = time.monotonic() - start
    wait(lambda: (c := _condition(cluster)) and c["status"] == "True", "GPUHealthy=True", 60)
    assert up >= installed["healthRecoveryPeriod"]
    report(
        f"health: XID 79 on GPU {victim}: allocatable 7 after {down:.1f} s, GPUHealthy=False and "
        f"a Warning XIDError Event; allocatable 8 again after {up:.1f} s (recovery period 8 s)"
    )


def test_live_config_edit_reaches_the_pod_without_restart(
    cluster: Cluster, installed: dict[str, Any]
) -> None:
    pod = chart.ready_plugin(cluster)
    (cm,) = [
        c
        for c in cluster.get("configmaps", ns=NAMESPACE)["items"]
        if c["metadata"]["name"].startswith("gpu")
    ]
    patch = {"data": {"default": TIME_SLICED.format(n=4)}}
    start = time.monotonic()
    cluster.kubectl(
        "patch",
        "configmap",
        "-n",
        NAMESPACE,
        cm["metadata"]["name"],
        "--type=merge",
        "-p",
        json.dumps(patch),
    )
    chart.allocatable_is(cluster, 32, timeout=180)
    delay = time.monotonic() - start
    assert cluster.capacity() == 32
    now = chart.ready_plugin(cluster)
    assert now["metadata"]["uid"] == pod["metadata"]["uid"]
    assert now["status"]["containerStatuses"][0]["restartCount"] == 0
    cluster.kubectl("patch", "configmap", "-n", NAMESPACE, cm["metadata"]["name"], "--type=merge",
                    "-p", json.dumps({"data": {"default": "version: v1\n"}}))  # fmt: skip
    chart.allocatable_is(cluster, 8, timeout=180)
    report(
        f"live config: ConfigMap edit to time-slicing replicas 4 -> capacity 32 in {delay:.1f} s "
        "(the kubelet's ConfigMap sync, syncFrequency 10 s here), same pod, no restart"
    )


def test_upgrade_rolls_the_pod_and_never_shows_zero(
    cluster: Cluster, installed: dict[str, Any]
) -> None:
    """`helm upgrade` to two named configs (per-node config by label): the pod rolls with a
    surge (the new pod, on its own socket, registers before the old one goes); the kubelet
    never marks the resource unhealthy, and the node's allocatable never reads 0 though pod
    "two" holds GPUs."""
    old = chart.ready_plugin(cluster)
    unhealthy = chart.kubelet_unhealthy_marks(cluster)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # an API blip is not a reading
                seen.append(cluster.allocatable())
            stop.wait(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    values = {
        **BASE,
        "config": {"map": {"default": "version: v1\n", "sliced": TIME_SLICED.format(n=2)}},
    }
    try:
        start = time.monotonic()
        chart.install(cluster, values)
        new = chart.replaced(cluster, old)
        chart.allocatable_is(cluster, 8)
        rolled = time.monotonic() - start
        cluster.kubectl(
            "label", "node", NODE, "nvidia.com/device-plugin.config=sliced", "--overwrite"
        )
        chart.allocatable_is(cluster, 16)
        labelled = time.monotonic() - start - rolled
        cluster.kubectl("label", "node", NODE, "nvidia.com/device-plugin.config-")
        chart.allocatable_is(cluster, 8)
    finally:
        stop.set()
        watcher.join()
    assert new["status"]["containerStatuses"][0]["restartCount"] == 0
    assert chart.kubelet_unhealthy_marks(cluster) == unhealthy, "the kubelet saw nvidia.com/gpu go"
    assert seen, "no reading of allocatable during the upgrade"
    assert min(seen) > 0, f"allocatable read {sorted(set(seen))} during the upgrade"
    assert chart.sockets() == [chart.socket_of(new)], chart.sockets()
    installed.update(values)
    report(
        f"upgrade: pod rolled in {rolled:.1f} s, allocatable never 0 ({len(seen)} reads, "
        f"min {min(seen)}); label config=sliced -> 16 in {labelled:.1f} s (per-node config)"
    )


def test_values_with_an_unknown_key_are_refused_naming_it() -> None:
    with pytest.raises(helm_python.HelmValuesError, match="noSuchKey"):
        chart.render({**BASE, "noSuchKey": True})
