"""The chart installed on the real cluster as `helm install` would: rendered by the Helm SDK
(values validated against the chart's schema: a bad key is refused here, naming it) and
applied with kubectl; `upgrade` renders changed values and applies them, `uninstall` deletes
what the release rendered. The plugin serves simulated GPUs from GPUS (the test-only
`simulatedDevices` value), a file on the node's /run (a tmpfs of the cluster's namespace)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import helm_python
import yaml

from aiodp.standins.testbed import DEMO_METRICS, gpu_uuid, h100_node, write_atomically
from tests.cluster.node import NODE, Cluster, wait

CHART = Path(__file__).resolve().parents[2] / "charts" / "nvidia-gpu"
NAMESPACE = "nvidia-device-plugin"
RELEASE = "gpu"
GPUS = Path("/run/aiodp-e2e/gpus.yaml")
BUSYBOX = "docker.io/library/busybox:aiodp-e2e"
UUIDS = [gpu_uuid(i) for i in range(8)]
SELECTOR = f"app.kubernetes.io/instance={RELEASE}"
BASE: dict[str, Any] = {
    "simulatedDevices": str(GPUS),
    "healthRecoveryPeriod": 8,
    "healthInterval": 1,
    "logLevel": "info",
}


def write_gpus(
    unhealthy: dict[int, str] | None = None, xids: dict[int, list[int]] | None = None
) -> None:
    """The node's simulated GPUs: 8 H100s (testbed.h100_node) with the demo's readings, some
    with XIDs."""
    # no /dev/nvidia<minor> here: a runtime refuses a device node that is not there
    text = "device_nodes: false\n" + h100_node(unhealthy, DEMO_METRICS)
    for i, codes in (xids or {}).items():
        text = text.replace(f"    index: {i}\n", f"    index: {i}\n    xids: {codes}\n", 1)
    GPUS.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(GPUS, text)


def render(values: dict[str, Any], release: str = RELEASE) -> list[dict[str, Any]]:
    """Raises helm_python.HelmValuesError naming a value the schema refuses."""
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values=values, name=release, namespace=NAMESPACE)
    objects = []
    for name, text in sorted(files.items()):
        if name.endswith(".yaml") and "/tests/" not in name:
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def install(cluster: Cluster, values: dict[str, Any]) -> list[dict[str, Any]]:
    objects = render(values)
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}])
    cluster.apply(objects)
    return objects


def uninstall(cluster: Cluster, values: dict[str, Any]) -> None:
    objects = [o for o in render(values) if o["kind"] != "Namespace"]
    text = yaml.safe_dump_all(objects)
    cluster.kubectl(
        "delete", "--wait=true", "--ignore-not-found", "-f", "-", input=text, timeout=120
    )
    wait(lambda: not plugin_pods(cluster), "the plugin pods to be gone", 90)


def plugin_pods(cluster: Cluster) -> list[dict[str, Any]]:
    return cluster.get("pods", ns=NAMESPACE)["items"]  # type: ignore[no-any-return]


def ready_plugin(
    cluster: Cluster, selector: str = SELECTOR, timeout: float = 120
) -> dict[str, Any]:
    """The one plugin pod, once its DaemonSet is rolled out and the pod is Ready."""

    def check() -> dict[str, Any] | None:
        pods = cluster.get("pods", ns=NAMESPACE)["items"]
        pods = [
            p for p in pods if _matches(p, selector) and not p["metadata"].get("deletionTimestamp")
        ]
        if len(pods) != 1:
            return None
        conds = {c["type"]: c["status"] for c in pods[0]["status"].get("conditions", [])}
        return pods[0] if conds.get("Ready") == "True" else None

    return wait(check, "the plugin pod to be Ready", timeout)


def replaced(cluster: Cluster, old: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    """The plugin pod that replaced `old`, once Ready."""

    def check() -> dict[str, Any] | None:
        pod = ready_plugin(cluster)
        return pod if pod["metadata"]["uid"] != old["metadata"]["uid"] else None

    return wait(check, "a new plugin pod to be Ready", timeout)


def ready_with(cluster: Cluster, n: int, resource: str = "nvidia.com/gpu") -> bool:
    """The node is Ready and shows `n` allocatable `resource`."""
    status = cluster.node()["status"]
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status["conditions"])
    return ready and status.get("allocatable", {}).get(resource) == str(n)


def _matches(pod: dict[str, Any], selector: str) -> bool:
    key, value = selector.split("=")
    return bool(pod["metadata"].get("labels", {}).get(key) == value)


def gpu_pod(
    name: str, gpus: int, resource: str = "nvidia.com/gpu", ns: str = "default"
) -> dict[str, Any]:
    """A busybox pod asking for `gpus` of `resource`; it prints its NVIDIA_* environment."""
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
        "spec": {
            "terminationGracePeriodSeconds": 1, "restartPolicy": "Never",
            "containers": [{
                "name": "cuda", "image": BUSYBOX, "imagePullPolicy": "Never",
                "command": ["sh", "-c", "env | grep '^NVIDIA_' | sort; exec sleep 3600"],
                "resources": {"limits": {resource: str(gpus)}},
            }],
        },
    }  # fmt: skip


def running(
    cluster: Cluster, name: str, ns: str = "default", timeout: float = 90
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        pod = cluster.get("pod", name, ns=ns, check=False)
        return pod if pod and pod["status"].get("phase") == "Running" else None

    return wait(check, f"pod {ns}/{name} to run", timeout)


def visible(cluster: Cluster, name: str, ns: str = "default") -> list[str]:
    """The UUIDs in NVIDIA_VISIBLE_DEVICES, as the pod printed it."""
    log = wait(lambda: cluster.kubectl("logs", "-n", ns, name) or None, f"{name}'s log", 30)
    match = re.search(r"^NVIDIA_VISIBLE_DEVICES=(.*)$", log, re.M)
    assert match, f"no NVIDIA_VISIBLE_DEVICES in {name}'s log: {log!r}"
    return match.group(1).split(",")


def delete_pods(cluster: Cluster, *names: str, ns: str = "default") -> None:
    cluster.kubectl(
        "delete", "pod", "-n", ns, "--ignore-not-found", "--wait=true", *names, timeout=120
    )


def allocatable_is(
    cluster: Cluster, n: int, resource: str = "nvidia.com/gpu", timeout: float = 90
) -> float:
    """Waits until the node's allocatable `resource` is `n`; returns the seconds it took."""
    start = time.monotonic()
    wait(
        lambda: cluster.allocatable(resource) == n,
        f"allocatable {resource} = {n} on {NODE}",
        timeout,
    )
    return time.monotonic() - start


def kubelet_unhealthy_marks(cluster: Cluster, resource: str = "nvidia.com/gpu") -> int:
    """How many times the kubelet marked every device of `resource` unhealthy (its last
    plugin for the resource went away)."""
    text = cluster.procs["kubelet"].log.read_text(errors="replace")
    return text.count(f'"Mark all resources Unhealthy for resource" resourceName="{resource}"')


def sockets() -> list[str]:
    """Our sockets in the kubelet's device-plugins directory."""
    return sorted(p.name for p in Path("/var/lib/kubelet/device-plugins").glob("aiodp-*.sock"))


def socket_of(pod: dict[str, Any], resource: str = "nvidia-gpu") -> str:
    """The socket a plugin pod serves `resource` on: tagged with its UID's first 8 letters."""
    tag = "".join(c for c in pod["metadata"]["uid"] if c.isalnum())[:8].lower()
    return f"aiodp-{resource}-{tag}.sock"


def kubelet_registrations(cluster: Cluster, resource: str = "nvidia.com/gpu") -> int:
    """How many times the kubelet logged a registration of `resource` (its device manager)."""
    text = cluster.procs["kubelet"].log.read_text(errors="replace")
    return text.count(
        f'"Got registration request from device plugin with resource" resourceName="{resource}"'
    )
