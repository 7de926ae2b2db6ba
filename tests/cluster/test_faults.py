"""Bad input and faults on the real node: a plugin that cannot start ends in CrashLoopBackOff
saying why in its last line; a bad upgrade never takes the GPUs away (the surge pod crashes,
the old one serves on); containerd killed for a moment and the API server down for 10 s lose
nothing (registration stays, node signals resume)."""

from __future__ import annotations

import signal
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

GOOD = {**BASE, "config": {"map": {"default": "version: v1\n"}}}
BAD = {**BASE, "config": {"map": {"default": "version: v1\nflags:\n  migStrategy: half\n"}}}
WHY = "flags.migStrategy: invalid value 'half': must be one of none, single, mixed"


@pytest.fixture(scope="module")
def faults(cluster: Cluster) -> Iterator[None]:
    chart.write_gpus()
    yield
    chart.uninstall(cluster, GOOD)


def _crashlooping(cluster: Cluster) -> dict[str, Any] | None:
    for pod in chart.plugin_pods(cluster):
        for c in pod["status"].get("containerStatuses", []):
            waiting = c["state"].get("waiting", {})
            if waiting.get("reason") == "CrashLoopBackOff":
                return pod
    return None


def _last_line(cluster: Cluster, pod: dict[str, Any]) -> str:
    name = pod["metadata"]["name"]
    log = cluster.kubectl("logs", "-n", chart.NAMESPACE, name, "--previous", check=False)
    return log.strip().splitlines()[-1]


def _pod_log(pod: dict[str, Any]) -> str:
    """The plugin's log read on the node (/var/log/pods), which works with the API down."""
    meta = pod["metadata"]
    d = Path("/var/log/pods") / f"{meta['namespace']}_{meta['name']}_{meta['uid']}" / "aiodp"
    return "".join(p.read_text(errors="replace") for p in sorted(d.glob("*.log")))


def test_a_plugin_that_cannot_start_crash_loops_saying_why(cluster: Cluster, faults: None) -> None:
    chart.install(cluster, BAD)
    pod = wait(lambda: _crashlooping(cluster), "the plugin pod in CrashLoopBackOff", 120)
    last = _last_line(cluster, pod)
    assert WHY in last, last
    status = pod["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] == 2, status
    assert cluster.allocatable() == 0
    chart.install(cluster, GOOD)
    chart.ready_plugin(cluster)
    chart.allocatable_is(cluster, 8)
    report(f"bad config through values: CrashLoopBackOff, exit 2, last log line: {last[-120:]!r}")


def test_a_bad_config_upgrade_never_takes_the_gpus_away(cluster: Cluster, faults: None) -> None:
    """The config lives in the ConfigMap, not the pod template: an upgrade to a bad config
    reaches the running plugin as a live reload, which it refuses, serving on."""
    serving = chart.ready_plugin(cluster)
    unhealthy = chart.kubelet_unhealthy_marks(cluster)
    seen = len(_pod_log(serving))
    chart.install(cluster, BAD)
    refused = f"config reload rejected, keeping the running config: {WHY}"
    wait(lambda: refused in _pod_log(serving)[seen:], "the plugin to refuse the bad config", 120)
    assert cluster.allocatable() == 8
    assert chart.kubelet_unhealthy_marks(cluster) == unhealthy
    chart.install(cluster, GOOD)
    now = chart.ready_plugin(cluster)
    assert now["metadata"]["uid"] == serving["metadata"]["uid"]
    restarts = [p["status"]["containerStatuses"][0]["restartCount"] for p in (serving, now)]
    assert restarts[0] == restarts[1], restarts  # (the first test's crash loop counted before)
    report("bad config upgrade: the running plugin refused the reload naming the key, served "
           "on (allocatable 8, same pod, no unhealthy mark)")  # fmt: skip


def test_containerd_killed_for_a_moment_loses_nothing(cluster: Cluster, faults: None) -> None:
    plugin = chart.ready_plugin(cluster)
    cluster.apply([chart.gpu_pod("survivor", 1)])
    chart.running(cluster, "survivor")
    before = cluster.get("pod", "survivor", ns="default")["status"]["containerStatuses"][0]
    registrations = chart.kubelet_registrations(cluster)
    kubelet_log = cluster.procs["kubelet"].log
    seen = len(kubelet_log.read_text(errors="replace"))
    cluster.procs["containerd"].stop(signal.SIGKILL)  # a crash, not a stop
    wait(lambda: "containerd.sock" in kubelet_log.read_text(errors="replace")[seen:],
         "the kubelet to notice containerd gone", 60)  # fmt: skip
    cluster.start_containerd()
    wait(lambda: chart.ready_with(cluster, 8), "the node Ready with allocatable 8", 90)
    after = cluster.get("pod", "survivor", ns="default")["status"]["containerStatuses"][0]
    assert after["containerID"] == before["containerID"]
    assert after["restartCount"] == 0
    now = chart.ready_plugin(cluster)
    assert now["metadata"]["uid"] == plugin["metadata"]["uid"]
    restarts = [p["status"]["containerStatuses"][0]["restartCount"] for p in (plugin, now)]
    assert restarts[0] == restarts[1], restarts
    assert chart.kubelet_registrations(cluster) == registrations  # the registration stayed
    report("containerd killed and restarted: plugin and workload kept their containers, "
           "registration stayed (no new Register), allocatable 8")  # fmt: skip


def _condition(cluster: Cluster) -> dict[str, Any] | None:
    conds = [c for c in cluster.node()["status"]["conditions"] if c["type"] == "GPUHealthy"]
    return conds[0] if conds else None


def test_api_server_down_10s_then_node_signals_resume(cluster: Cluster, faults: None) -> None:
    plugin = chart.ready_plugin(cluster)
    registrations = chart.kubelet_registrations(cluster)
    log_before = len(_pod_log(plugin))
    before = {
        e["metadata"]["name"]
        for e in _xid_events(cluster, UUIDS[6]) + _xid_events(cluster, UUIDS[7])
    }
    cluster.procs["kube-apiserver"].stop()
    down = time.monotonic()
    victim = 7 if UUIDS[7] not in chart_visible_safe(cluster) else 6
    chart.write_gpus(xids={victim: [79]})  # a fault while nobody can be told

    def told_api_down() -> bool:
        fresh = _pod_log(plugin)[log_before:]
        return "node signals: cannot" in fresh and time.monotonic() - down >= 10

    wait(told_api_down, "the plugin to find the API down (10 s outage)", 60)
    cluster.start_apiserver()
    back = time.monotonic()

    def event() -> dict[str, Any] | None:
        new = [
            e for e in _xid_events(cluster, UUIDS[victim]) if e["metadata"]["name"] not in before
        ]
        return new[0] if new else None

    # the GPU recovered (period 8 s) while the API was down: the condition ends True, and
    # the Event of the fault seen meanwhile is written late, not lost
    ev = wait(event, "the XIDError Event of the outage's fault", 90)
    resumed = time.monotonic() - back
    assert ev["type"] == "Warning", ev
    chart.allocatable_is(cluster, 8, timeout=90)
    wait(lambda: (c := _condition(cluster)) and c["status"] == "True", "GPUHealthy=True", 60)
    assert chart.kubelet_registrations(cluster) == registrations
    assert chart.ready_plugin(cluster)["metadata"]["uid"] == plugin["metadata"]["uid"]
    chart.delete_pods(cluster, "survivor")
    report(
        f"API server down {back - down:.0f} s with an XID meanwhile: registration stayed; "
        f"the fault's Event written {resumed:.1f} s after the API came back; GPUHealthy True"
    )


def _xid_events(cluster: Cluster, uuid: str) -> list[dict[str, Any]]:
    """The XIDError Events naming `uuid` (an earlier test's stay: Events live an hour)."""
    items = cluster.get("events", ns="default")["items"]
    return [e for e in items if e.get("reason") == "XIDError" and uuid in (e.get("message") or "")]


def chart_visible_safe(cluster: Cluster) -> list[str]:
    """The survivor pod's GPUs, read from its log file on the node (the API is down)."""
    logs = list(Path("/var/log/pods").glob("default_survivor_*/cuda/*.log"))
    text = "".join(p.read_text(errors="replace") for p in logs)
    for line in text.splitlines():
        if "NVIDIA_VISIBLE_DEVICES=" in line:
            return line.split("NVIDIA_VISIBLE_DEVICES=", 1)[1].strip().split(",")
    return []
