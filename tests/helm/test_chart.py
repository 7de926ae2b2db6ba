"""The Helm chart rendered by the Helm SDK, each object checked against Kubernetes' schemas."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests import scripts

helm_python = pytest.importorskip("helm_python")  # its wheels are x86-64 only
pytestmark = pytest.mark.helm

ROOT = Path(__file__).resolve().parents[2]
CHART = str(ROOT / "charts" / "nvidia-gpu")
KUBE_VERSIONS = ("1.29.0", "1.33.0")
CRDS = {"ServiceMonitor", "PodMonitor"}  # monitoring.coreos.com: not in Kubernetes' schemas

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "cdi": {"deviceListStrategy": ["cdi-annotations", "cdi-cri"], "deviceIDStrategy": "index"},
    "mig-mixed-configmap": {
        "migStrategy": "mixed",
        "config": {
            "map": {
                "default": "version: v1\nflags:\n  migStrategy: mixed\n",
                "ts": "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                "    - name: nvidia.com/gpu\n      replicas: 4\n",
            },
            "default": "ts",
        },
    },
    "cpu-manager": {"compatWithCPUManager": True, "nvidiaDriverRoot": "/run/nvidia/driver"},
    "service-monitor": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "healthInterval": 2.5,
        "healthRecoveryPeriod": 0,
        "shutdownTimeout": 8,
        "logFormat": "json",
    },
    "dra": {
        "dra": {"enabled": True, "devices": [4, 5, "GPU-abc"]},
        "deviceListStrategy": ["cdi-cri"],
    },
    "pod-monitor-no-probes": {
        "metrics": {"podMonitor": {"enabled": True}},
        "probes": {"liveness": {"enabled": False}},
        "runtimeClassName": "nvidia",
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values=values, name="gpu", namespace="kube-system")
    objects = []
    for name, text in sorted(files.items()):
        if name.endswith(".yaml"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def kind(objects: list[dict[str, Any]], k: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == k]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (ds,) = kind(objects, "DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from>") for e in container(objects)["env"]}


def pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (ds,) = kind(objects, "DaemonSet")
    return ds["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_chart_lints_clean() -> None:
    result = helm_python.lint(CHART, strict=True)
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] >= 2] == []


NEWER: dict[str, tuple[str, ...]] = {"dra": ("1.37.0",)}
"""Value sets whose objects exist only in newer Kubernetes (DRA's DeviceClass is GA in 1.34,
ValidatingAdmissionPolicy in 1.30)."""


def cases() -> Iterator[tuple[str, str]]:
    for name in VALUE_SETS:
        for version in NEWER.get(name, KUBE_VERSIONS):
            yield name, version


@pytest.mark.parametrize(("values", "version"), list(cases()))
def test_chart_objects_validate(values: str, version: str) -> None:
    objects = render(VALUE_SETS[values])
    assert kind(objects, "DaemonSet")
    for obj in objects:
        if obj["kind"] in CRDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(obj, version, strict=True)


def test_chart_defaults() -> None:
    objects = render({})
    c = container(objects)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    sc = c["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["resources"]["requests"]
    assert c["resources"]["limits"]["memory"]
    assert env(objects) == {
        "NODE_NAME": "<from>",
        "NVIDIA_VISIBLE_DEVICES": "all",
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        "KUBELET_SOCKET": "/var/lib/kubelet/device-plugins/kubelet.sock",
        "AIODP_METRICS_ADDRESS": ":8080",
        "MPS_ROOT": "/run/nvidia/mps",  # always, as NVIDIA's chart
        "AIODP_POD_UID": "<from>",  # the pod's UID: tags our sockets
    }  # nothing else: unset values leave the program's defaults alone
    spec = pod(objects)
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["terminationGracePeriodSeconds"] > 10
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {t["matchExpressions"][0]["key"] for t in terms["nodeSelectorTerms"]}
    assert keys == {
        "feature.node.kubernetes.io/pci-10de.present",
        "feature.node.kubernetes.io/cpu-model.vendor_id",  # Tegra, as NVIDIA's chart
        "nvidia.com/gpu.present",
    }
    plugins, pods = spec["volumes"]
    assert plugins["hostPath"] == {"path": "/var/lib/kubelet/device-plugins", "type": "Directory"}
    assert pods["hostPath"] == {
        "path": "/var/lib/kubelet/pod-resources",
        "type": "DirectoryOrCreate",
    }
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/var/lib/kubelet/pod-resources"]["readOnly"] is True
    assert not kind(objects, "ConfigMap")
    assert not kind(objects, "ServiceMonitor")
    (role,) = kind(objects, "ClusterRole")  # node signals: its own node's condition, Events
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    ]
    assert spec["serviceAccountName"] == "gpu-nvidia-gpu"
    assert "privileged" not in sc


def test_chart_env_only_when_set() -> None:
    objects = render(VALUE_SETS["cdi"] | {"failOnInitError": False, "healthInterval": 2})
    e = env(objects)
    assert e["DEVICE_LIST_STRATEGY"] == "cdi-annotations,cdi-cri"
    assert e["DEVICE_ID_STRATEGY"] == "index"
    assert e["FAIL_ON_INIT_ERROR"] == "false"
    assert e["AIODP_HEALTH_INTERVAL"] == "2"
    assert "MIG_STRATEGY" not in e
    assert "PASS_DEVICE_SPECS" not in e


def test_chart_config_map_is_mounted_as_a_directory() -> None:
    objects = render(VALUE_SETS["mig-mixed-configmap"])
    (cm,) = kind(objects, "ConfigMap")
    assert set(cm["data"]) == {"default", "ts"}
    # several configs: the node's label picks one, "ts" for a node without it
    assert env(objects)["AIODP_CONFIG_DIR"] == "/config"
    assert env(objects)["DEFAULT_CONFIG"] == "ts"
    assert "CONFIG_FILE" not in env(objects)
    assert pod(objects)["serviceAccountName"] == "gpu-nvidia-gpu"
    (role,) = kind(objects, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    ]
    assert kind(objects, "ClusterRoleBinding")[0]["subjects"][0]["name"] == "gpu-nvidia-gpu"
    assert env(objects)["MIG_STRATEGY"] == "mixed"
    assert env(objects)["NVIDIA_MIG_MONITOR_DEVICES"] == "all"
    mount = next(m for m in container(objects)["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/config"
    assert "subPath" not in mount  # subPath mounts never see ConfigMap edits
    vol = next(v for v in pod(objects)["volumes"] if v["name"] == "config")
    assert vol["configMap"]["name"] == cm["metadata"]["name"]


def test_chart_external_config_map() -> None:
    objects = render({"config": {"name": "my-configs"}})
    assert not kind(objects, "ConfigMap")
    assert env(objects)["AIODP_CONFIG_DIR"] == "/config"  # its keys are named configs
    assert env(objects)["FALLBACK_STRATEGIES"] == "named,single"
    one = {"config": {"map": {"only": "version: v1"}}, "nodeSignals": {"enabled": False}}
    assert kind(render(one), "ClusterRole") == []
    assert "serviceAccountName" not in pod(render(one))
    assert env(render(one))["AIODP_NODE_SIGNALS"] == "false"
    vol = next(v for v in pod(objects)["volumes"] if v["name"] == "config")
    assert vol["configMap"]["name"] == "my-configs"


def test_chart_compat_with_cpu_manager_is_privileged() -> None:
    objects = render(VALUE_SETS["cpu-manager"])
    assert container(objects)["securityContext"] == {"privileged": True}
    assert env(objects)["PASS_DEVICE_SPECS"] == "true"
    assert env(objects)["NVIDIA_DRIVER_ROOT"] == "/run/nvidia/driver"
    # the driver root is not mounted: aiodp never reads it (device specs are host paths)
    assert "driver-root" not in {v["name"] for v in pod(objects)["volumes"]}


def test_chart_service_monitor() -> None:
    objects = render(VALUE_SETS["service-monitor"])
    (svc,) = kind(objects, "Service")
    (sm,) = kind(objects, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert env(objects)["AIODP_LOG_FORMAT"] == "json"
    assert env(objects)["AIODP_HEALTH_RECOVERY_PERIOD"] == "0"
    assert env(objects)["AIODP_SHUTDOWN_TIMEOUT"] == "8"


def test_chart_metrics_off_means_no_probes() -> None:
    objects = render({"metrics": {"enabled": False}})
    c = container(objects)
    assert "livenessProbe" not in c
    assert "ports" not in c
    assert env(objects)["AIODP_METRICS_ADDRESS"] == ""


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"healthInterval": "5s"}, "/healthInterval"),
        ({"migStrategy": "half"}, "/migStrategy"),
        ({"deviceListStrategy": "files"}, "/deviceListStrategy"),
        ({"noSuchValue": 1}, "additional properties 'noSuchValue'"),
        ({"metrics": {"port": 0}}, "/metrics/port"),
        ({"terminationGracePeriodSeconds": 5}, "/terminationGracePeriodSeconds"),
        ({"simulatedDevices": "gpus.yaml"}, "/simulatedDevices"),
    ],
)
def test_chart_schema_refuses_bad_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=where):
        render(values)


def test_chart_map_and_name_are_exclusive() -> None:
    with pytest.raises(helm_python.HelmError, match="exclusive"):
        render({"config": {"map": {"a": "version: v1"}, "name": "b"}})


def test_chart_and_image_version_is_the_package_version() -> None:
    """One version source (aiodp/_version.py): pyproject reads it, the chart and the image
    repeat it, and this test fails when they drift."""
    import tomllib

    from aiodp._version import VERSION

    root = Path(CHART).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "aiodp._version.VERSION"}
    chart = yaml.safe_load((Path(CHART) / "Chart.yaml").read_text())
    assert (chart["version"], chart["appVersion"]) == (VERSION, VERSION)
    assert f"ARG VERSION={VERSION}\n" in (root / "Dockerfile").read_text()


# NVIDIA's chart keys as a migrating user's values files set them (written from NVIDIA's
# v0.17 and v0.20 values.yaml key by key; the files themselves are not copied here).
NVIDIA_V020: dict[str, Any] = {
    "config": {"map": {}, "name": "", "default": "", "fallbackStrategies": ["named", "single"]},
    "compatWithCPUManager": None, "migStrategy": None, "failOnInitError": None,
    "deviceListStrategy": None, "deviceIDStrategy": None, "nvidiaDriverRoot": None,
    "gdrcopyEnabled": None, "gdsEnabled": None, "mofedEnabled": None,
    "deviceDiscoveryStrategy": None, "nameOverride": "", "fullnameOverride": "",
    "namespaceOverride": "", "selectorLabelsOverride": {}, "allowDefaultNamespace": False,
    "imagePullSecrets": [], "image": {"repository": "nvcr.io/nvidia/k8s-device-plugin",
    "pullPolicy": "IfNotPresent", "tag": ""}, "updateStrategy": {"type": "RollingUpdate"},
    "podAnnotations": {}, "podSecurityContext": {}, "securityContext": {}, "resources": {},
    "nodeSelector": {}, "priorityClassName": "system-node-critical", "runtimeClassName": None,
    "devicePlugin": {"enabled": True, "enableHostNetwork": False},
    "gfd": {"enabled": False, "nameOverride": "gpu-feature-discovery", "namespaceOverride": "",
            "noTimestamp": None, "sleepInterval": None, "securityContext": {"privileged": True},
            "podAnnotations": {}, "resources": {}},
    "nfd": {"nameOverride": "node-feature-discovery", "enableNodeFeatureApi": False,
            "master": {"serviceAccount": {"name": "node-feature-discovery", "create": True}},
            "worker": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}},
    "mps": {"enableHostPID": True, "root": "/run/nvidia/mps"},
    "cdi": {"nvidiaHookPath": None, "featureFlags": None},
}  # fmt: skip
NVIDIA_OVERRIDES: dict[str, dict[str, Any]] = {
    "mig-mixed-named-configs": {
        "migStrategy": "mixed",
        "config": {"map": {"default": "version: v1\nflags: {migStrategy: mixed}\n",
                           "a100": "version: v1\nflags: {migStrategy: single}\n"},
                   "default": "a100"},
    },
    "time-slicing": {
        "config": {"map": {"default": "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                           "    - {name: nvidia.com/gpu, replicas: 4}\n"}},
    },
    "cdi": {"deviceListStrategy": "cdi-cri", "gdsEnabled": True,
            "cdi": {"nvidiaHookPath": "/usr/local/bin/nvidia-cdi-hook",
                    "featureFlags": ["disable-nvsandboxutils"]}},
}  # fmt: skip


@pytest.mark.parametrize("name", ["v0.20", *NVIDIA_OVERRIDES])
def test_chart_takes_nvidia_values_files(name: str) -> None:
    values = {**NVIDIA_V020, **NVIDIA_OVERRIDES.get(name, {})}
    lint = helm_python.lint(CHART, values=values, strict=True, namespace="kube-system")
    assert lint["errors"] == []
    objects = render(values)  # the schema checks every key on the way
    for obj in objects:
        if obj["kind"] not in CRDS:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
    e = env(objects)
    assert e["MPS_ROOT"] == "/run/nvidia/mps"
    if name == "cdi":
        assert e["NVIDIA_CDI_HOOK_PATH"] == "/usr/local/bin/nvidia-cdi-hook"
        assert e["CDI_FEATURE_FLAGS"] == "disable-nvsandboxutils"
        assert e["GDS_ENABLED"] == "true"
    caps = container(objects)["securityContext"]["capabilities"]
    assert (caps.get("add") == ["SYS_ADMIN"]) == (name != "v0.20" and name != "cdi")


def test_chart_tegra_affinity_term_is_there() -> None:
    terms = pod(render({}))["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    keys = {e["key"] for t in terms for e in t["matchExpressions"]}
    assert "feature.node.kubernetes.io/cpu-model.vendor_id" in keys


def test_chart_config_map_without_a_usable_default_fails_at_render() -> None:
    with pytest.raises(Exception, match=r"config.map has 2 configs \(a, b\)"):
        render({"config": {"map": {"a": "version: v1", "b": "version: v1"}}})


def test_chart_default_namespace_is_refused_as_nvidia() -> None:
    with helm_python.Chart.load(CHART) as chart, pytest.raises(Exception, match="default"):
        chart.render(values={}, name="gpu", namespace="default")
    with helm_python.Chart.load(CHART) as chart:
        assert chart.render(values={"allowDefaultNamespace": True}, name="gpu", namespace="default")


def test_chart_device_plugin_disabled_renders_no_daemonset() -> None:
    assert kind(render({"devicePlugin": {"enabled": False}}), "DaemonSet") == []


def test_chart_simulated_devices_are_test_only_and_off_by_default() -> None:
    """`simulatedDevices` (make cluster-e2e): the file's directory read-only, the backend
    simulated; unset, nothing of it renders."""
    assert "AIODP_BACKEND" not in env(render({}))
    assert "simulated-devices" not in {v["name"] for v in pod(render({}))["volumes"]}
    objects = render({"simulatedDevices": "/run/aiodp-e2e/gpus.yaml"})
    assert env(objects)["AIODP_BACKEND"] == "simulated"
    assert env(objects)["AIODP_SIMULATED_DEVICES"] == "/simulated/gpus.yaml"
    mounts = {m["mountPath"]: m for m in container(objects)["volumeMounts"]}
    assert mounts["/simulated"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod(objects)["volumes"]}
    assert volumes["simulated-devices"]["hostPath"] == {
        "path": "/run/aiodp-e2e",
        "type": "Directory",
    }


def test_chart_rolls_with_a_surge_unless_two_pods_would_collide() -> None:
    """A surge by default (the new pod registers before the old one goes; each has its own
    socket, tagged with its UID); one at a time where two pods of a node would share host
    ports, DRA sockets or MPS daemons; a user's own strategy is kept."""
    (ds,) = kind(render({}), "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }  # fmt: skip
    (uid,) = [e for e in container(render({}))["env"] if e["name"] == "AIODP_POD_UID"]
    assert uid["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    one_at_a_time = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    mps = {"config": {"map": {"default": "version: v1\nsharing:\n  mps:\n    resources: []\n"}}}
    for values in ({"devicePlugin": {"enableHostNetwork": True}}, {"dra": {"enabled": True}}, mps):
        (ds,) = kind(render(values), "DaemonSet")
        assert ds["spec"]["updateStrategy"] == one_at_a_time, values
    (ds,) = kind(render({"updateStrategy": {"type": "OnDelete"}}), "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}


def test_chart_cdi_mounts_the_spec_directories_read_only() -> None:
    objects = render(VALUE_SETS["cdi"])
    mounts = {m["mountPath"]: m for m in container(objects)["volumeMounts"]}
    assert mounts["/etc/cdi"]["readOnly"] is True
    assert mounts["/var/run/cdi"]["readOnly"] is True
    assert "/var/run/cdi" not in {m["mountPath"] for m in container(render({}))["volumeMounts"]}


@pytest.mark.parametrize(
    ("metrics", "socket"),
    [
        ({"podAttribution": False}, ""),
        ({"enabled": False}, ""),
        ({"podResourcesPath": "/k/pod-resources"}, "/k/pod-resources/kubelet.sock"),
    ],
)
def test_chart_pod_attribution(metrics: dict[str, Any], socket: str) -> None:
    objects = render({"metrics": metrics})
    assert env(objects)["AIODP_POD_RESOURCES_SOCKET"] == socket
    mounted = {m["mountPath"] for m in container(objects)["volumeMounts"]}
    assert ("/k/pod-resources" in mounted) == bool(socket)
    assert "/var/lib/kubelet/pod-resources" not in mounted


def test_chart_static_manifests_match_the_chart() -> None:
    """deployments/static/ is generated from the chart (`make manifests`): no drift."""
    root = Path(CHART).parents[1]
    module = scripts.load("manifests")
    committed = (root / "deployments/static/nvidia-gpu.yaml").read_text()
    assert module.render() == committed, "run `make manifests` and commit the result"
    objects = [doc for doc in yaml.safe_load_all(committed) if doc]
    for obj in objects:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_chart_dra_renders_its_mounts_rbac_policy_and_class() -> None:
    objects = render(VALUE_SETS["dra"])
    e = env(objects)
    assert e["AIODP_DRA"] == "true"
    assert e["AIODP_DRA_DEVICES"] == "4,5,GPU-abc"
    mounts = {m["name"]: m for m in container(objects)["volumeMounts"]}
    assert mounts["dra-plugin"]["mountPath"] == "/var/lib/kubelet/plugins/gpu.aiodp.io"
    assert mounts["dra-registry"]["mountPath"] == "/var/lib/kubelet/plugins_registry"
    assert not mounts["dra-cdi"].get("readOnly")  # claim specs are written there
    assert "cdi-run" not in mounts  # the same directory, mounted once, writable
    (role,) = kind(objects, "ClusterRole")
    rules = {r["resources"][0]: r["verbs"] for r in role["rules"]}
    assert "create" in rules["resourceslices"]
    assert rules["resourceclaims"] == ["get"]
    (policy,) = kind(objects, "ValidatingAdmissionPolicy")
    account = "system:serviceaccount:kube-system:gpu-nvidia-gpu"
    assert account in policy["spec"]["matchConditions"][0]["expression"]
    (cls,) = kind(objects, "DeviceClass")
    assert cls["spec"]["selectors"][0]["cel"]["expression"] == "device.driver == 'gpu.aiodp.io'"
    assert pod(objects).get("serviceAccountName")


def test_chart_without_dra_renders_nothing_of_it() -> None:
    objects = render({})
    assert not kind(objects, "DeviceClass")
    assert not kind(objects, "ValidatingAdmissionPolicy")
    assert not [k for k in env(objects) if k.startswith("AIODP_DRA")]


def _paths(tree: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _paths(value, f"{prefix}{key}.")
    return out


def test_chart_readme_names_only_nvidias_values_as_nvidias() -> None:
    """The README's migration table: every key in its 'NVIDIA chart value' column is one of
    NVIDIA's (it listed passDeviceSpecs and nvidiaDevRoot, which NVIDIA's chart lacks)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| NVIDIA chart value |") :].split("\n\n")[0].splitlines()[2:]
    nvidia = _paths(NVIDIA_V020) | {"affinity", "tolerations"}
    named = []
    for row in table:
        for key in re.findall(r"`([^`]+)`", row.split("|")[1]):
            head, _, rest = key.partition(".{")
            named += [f"{head}.{k}" for k in rest.rstrip("}").split(",")] if rest else [key]
    assert len(named) > 30
    assert [k for k in named if k not in nvidia and not k.endswith(".*")] == []


def notes(values: dict[str, Any]) -> str:
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values=values, name="gpu", namespace="kube-system")
    return str(next(text for name, text in files.items() if name.endswith("NOTES.txt")))


def test_chart_gfd_enabled_writes_gfds_labels_with_rbac_to_match() -> None:
    values = {"gfd": {"enabled": True, "sleepInterval": "60s", "oneshot": False,
                      "noTimestamp": True}}  # fmt: skip
    objects = render(values)
    e = env(objects)
    assert e["AIODP_GFD"] == "true"
    assert e["NAMESPACE"] == "<from>"
    assert e["GFD_NO_TIMESTAMP"] == "true"
    assert "GFD_USE_NODE_FEATURE_API" not in e
    (role,) = kind(objects, "ClusterRole")
    assert {"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]} in role["rules"]
    assert {
        "apiGroups": ["nfd.k8s-sigs.io"],
        "resources": ["nodefeatures"],
        "verbs": ["get", "list", "create", "update"],
    } in role["rules"]
    text = notes(values)
    assert "writes GPU Feature Discovery's nvidia.com/* node labels itself" in text
    assert "gfd.oneshot, gfd.sleepInterval: no meaning here" in text
    # the nvidia.com/gpu.present and pci-10de affinity keeps working
    terms = pod(objects)["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    keys = {x["key"] for t in terms for x in t["matchExpressions"]}
    assert {"feature.node.kubernetes.io/pci-10de.present", "nvidia.com/gpu.present"} <= keys
    for obj in objects:
        if obj["kind"] not in CRDS:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)


def test_chart_gfd_off_asks_for_nothing() -> None:
    objects = render({})
    assert "AIODP_GFD" not in env(objects)
    (role,) = kind(objects, "ClusterRole")
    assert all("nfd.k8s-sigs.io" not in r["apiGroups"] for r in role["rules"])


def test_chart_an_mps_config_mounts_the_mps_root_with_host_pid() -> None:
    mps = (
        "version: v1\nsharing:\n  mps:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 4}\n"
    )
    objects = render({"config": {"map": {"default": mps}}})
    spec = pod(objects)
    assert spec["hostPID"] is True
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    assert mounts["mps-root"] == "/run/nvidia/mps"
    assert container(objects)["securityContext"]["capabilities"]["add"] == ["SYS_ADMIN"]
    assert "hostPID" not in pod(render({"mps": {"enableHostPID": True}}))  # no MPS config
    assert "runs and supervises one nvidia-cuda-mps-control daemon" in notes({})


def test_chart_dra_compat_nvidia_serves_nvidias_classes_and_driver_name() -> None:
    objects = render({"dra": {"enabled": True, "devices": "all", "compat": "nvidia"}})
    assert env(objects)["AIODP_DRA_DRIVER_NAME"] == "gpu.nvidia.com"
    mounts = {m["name"]: m for m in container(objects)["volumeMounts"]}
    assert mounts["dra-plugin"]["mountPath"] == "/var/lib/kubelet/plugins/gpu.nvidia.com"
    classes = {c["metadata"]["name"]: c["spec"] for c in kind(objects, "DeviceClass")}
    assert sorted(classes) == ["gpu.nvidia.com", "mig.nvidia.com"]
    assert classes["gpu.nvidia.com"]["extendedResourceName"] == "nvidia.com/gpu"  # all on DRA
    assert "type == 'mig'" in classes["mig.nvidia.com"]["selectors"][0]["cel"]["expression"]
    text = notes({"dra": {"enabled": True, "compat": "nvidia"}})
    assert "Never run NVIDIA's DRA driver on the" in text
    for obj in objects:
        if obj["kind"] not in CRDS:
            kubernetes_validate.validate(obj, "1.37.0", strict=True)


def test_chart_dra_all_gpus_back_nvidia_com_gpu_through_the_class() -> None:
    """KEP-5004: with every GPU on DRA the class carries extendedResourceName (and the device
    plugin registers no nvidia.com/gpu); with some, it does not."""
    (cls,) = kind(render({"dra": {"enabled": True, "devices": "all"}}), "DeviceClass")
    assert cls["spec"]["extendedResourceName"] == "nvidia.com/gpu"
    (some,) = kind(render({"dra": {"enabled": True, "devices": [4]}}), "DeviceClass")
    assert "extendedResourceName" not in some["spec"]
