"""Which flags and environment variables there are: the argv parser (each subcommand's) and
the environment names, NVIDIA's where it has the setting."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Final, NoReturn, TypeVar

from aiodp.config.model import DEFAULT_KUBELET_SOCKET, DEFAULT_POD_RESOURCES_SOCKET
from aiodp.kit.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


T = TypeVar("T")


COMMANDS: Final = ("serve", "demo", "status")
DESCRIPTIONS: Final[Mapping[str, str]] = {
    "serve": "Kubernetes device plugin for NVIDIA GPUs: serve this node's GPUs to the kubelet "
    "(the default command)",
    "demo": "the plugin on 8 simulated H100s against an embedded kubelet stand-in, told step "
    "by step",
    "status": "the node as the running plugin sees it, from its /status endpoint",
}
STATUS_FLAGS: Final = frozenset({"--output", "--metrics-address", "--log-level", "--log-format"})
"""What `aiodp status` takes: how to print, where the plugin serves /status, its own logs."""
DEMO_SETS: Final = frozenset(
    {"--kubelet-socket", "--backend", "--simulated-devices", "--pod-resources-socket",
     "--device-metrics-interval"}
)  # fmt: skip
"""What the demo sets itself (its stand-in kubelet, its simulated node): not its flags."""


def _takes(command: str | None, flag: str) -> bool:
    if command is None:
        return True
    if command == "status":
        return flag in STATUS_FLAGS
    if flag == "--output":
        return False
    return not (command == "demo" and flag in DEMO_SETS)


def parser(command: str | None = None, *, add_help: bool = True) -> _Parser:
    """The flags of `command` (`serve`, `demo`, `status`); None: every flag, for finding the
    command in an argv before its own parser reads it."""
    p = _Parser(
        prog="aiodp" if command in (None, "serve") else f"aiodp {command}",
        description=DESCRIPTIONS[command or "serve"],
        add_help=add_help,
        usage=None if command is not None else argparse.SUPPRESS,
    )
    p.add_argument("command", nargs="?", choices=COMMANDS, default=None, metavar="COMMAND",
                   help="serve (the default), demo or status")  # fmt: skip
    p.add_argument("--version", action="store_true", help="print the version and commit, exit")

    def add(*names: str, **kw: object) -> None:
        if _takes(command, names[0]):
            p.add_argument(*names, **kw)  # type: ignore[arg-type]

    add("--output", "-o", choices=("table", "json", "yaml"), default="table",
        help="how to print [table]")  # fmt: skip
    add("--config-file", help="NVIDIA's version: v1 config file, applied live (CONFIG_FILE)")
    add("--mig-strategy", help="none|single|mixed (MIG_STRATEGY) [none]")
    add(
        "--shared-devices-allocation-policy",
        help="distributed|packed (SHARED_DEVICES_ALLOCATION_POLICY) [distributed]",
    )
    add("--mps-root", help="host directory of the MPS daemon's pipes (MPS_ROOT)")
    add("--mps-control", help="the MPS control binary (AIODP_MPS_CONTROL) "
        "[nvidia-cuda-mps-control]")  # fmt: skip
    add("--nvidia-smi", help="nvidia-smi, for DRA time slices (AIODP_NVIDIA_SMI) [nvidia-smi]")
    add("--mps-mount-shm", nargs="?", const="true",
        help="mount a tmpfs at <mpsRoot>/shm (AIODP_MPS_MOUNT_SHM) [true]")  # fmt: skip
    add(
        "--kubelet-socket",
        help=f"kubelet registration socket (KUBELET_SOCKET) [{DEFAULT_KUBELET_SOCKET}]",
    )
    add("--backend", help="auto|nvml|simulated (AIODP_BACKEND) [auto]")
    add("--simulated-devices", help="YAML file of simulated GPUs (AIODP_SIMULATED_DEVICES)")
    add("--device-id-strategy", help="uuid|index (DEVICE_ID_STRATEGY) [uuid]")
    add(
        "--device-list-strategy",
        action="append",
        help="comma list of envvar, volume-mounts, cdi-annotations, cdi-cri; "
        "repeat to add more (DEVICE_LIST_STRATEGY) [envvar]",
    )
    add(
        "--gdrcopy-enabled",
        nargs="?",
        const="true",
        help="NVIDIA_GDRCOPY=enabled (GDRCOPY_ENABLED)",
    )
    add("--gds-enabled", nargs="?", const="true", help="NVIDIA_GDS=enabled (GDS_ENABLED)")
    add("--mofed-enabled", nargs="?", const="true", help="NVIDIA_MOFED=enabled (MOFED_ENABLED)")
    add("--imex-channel-ids", help="IMEX channels to inject: empty or 0 (IMEX_CHANNEL_IDS)")
    add(
        "--imex-required",
        nargs="?",
        const="true",
        help="exit when an IMEX channel node is missing (IMEX_REQUIRED) [false]",
    )
    add(
        "--device-discovery-strategy",
        help="auto|nvml|tegra; tegra is not supported (DEVICE_DISCOVERY_STRATEGY) [auto]",
    )
    add(
        "--driver-root-ctr-path",
        "--container-driver-root",
        dest="container_driver_root",
        help="where the driver root is mounted in this container (DRIVER_ROOT_CTR_PATH) "
        "[/driver-root]",
    )
    add(
        "--nvidia-cdi-hook-path",
        "--nvidia-ctk-path",
        dest="nvidia_cdi_hook_path",
        help="nvidia-cdi-hook for generated CDI specs (NVIDIA_CDI_HOOK_PATH) [/usr/bin/nvidia-ctk]",
    )
    add("--cdi-feature-flags", action="append", help="comma list (CDI_FEATURE_FLAGS)")
    add("--cdi-disable-hooks", action="append", help="comma list, or all (CDI_DISABLE_HOOKS)")
    add("--config-dir", help="a ConfigMap of named configs, one per node by label "
        "(AIODP_CONFIG_DIR, CONFIG_FILE_SRCDIR)")  # fmt: skip
    add("--node-name", help="this node's name, for its config label (NODE_NAME)")
    add("--pod-uid", help="this plugin pod's UID (AIODP_POD_UID; the chart sets it): tags our "
        "socket names, so two plugin pods of a node (a surge upgrade) never share one")  # fmt: skip
    add("--node-label", help="the label naming this node's config (NODE_LABEL) "
        "[nvidia.com/device-plugin.config]")  # fmt: skip
    add("--default-config", help="config for nodes without the label (DEFAULT_CONFIG)")
    add("--fallback-strategies", help="named,single,empty (FALLBACK_STRATEGIES) [named,single]")
    add("--kubeconfig", help="kubeconfig outside a pod (AIODP_KUBECONFIG) [the service account]")
    add(
        "--cdi-spec-dirs",
        help="where the node's CDI specs are, checked against the names we hand out "
        "(AIODP_CDI_SPEC_DIRS) [/etc/cdi,/var/run/cdi]",
    )
    add(
        "--pass-device-specs",
        nargs="?",
        const="true",
        help="true|false (PASS_DEVICE_SPECS) [false]",
    )
    add("--cdi-annotation-prefix", help="(CDI_ANNOTATION_PREFIX) [cdi.k8s.io/]")
    add("--cdi-kind", help="CDI vendor/class (AIODP_CDI_KIND) [nvidia.com/gpu]")
    add(
        "--nvidia-driver-root",
        "--driver-root",
        dest="nvidia_driver_root",
        help="driver root on the host (NVIDIA_DRIVER_ROOT) [/]",
    )
    add(
        "--nvidia-dev-root",
        "--dev-root",
        dest="nvidia_dev_root",
        help="/dev root on the host (NVIDIA_DEV_ROOT) [driver root]",
    )
    add(
        "--fail-on-init-error",
        nargs="?",
        const="true",
        help="true|false (FAIL_ON_INIT_ERROR) [true]",
    )
    add("--log-level", help="debug|info|warning|error (AIODP_LOG_LEVEL) [info]")
    add("--log-format", help="text|json (AIODP_LOG_FORMAT) [text]")
    add("--metrics-address", help="HOST:PORT, empty = off (AIODP_METRICS_ADDRESS) [:8080]")
    add("--health-interval", help="seconds between health probes (AIODP_HEALTH_INTERVAL) [5]")
    add(
        "--health-recovery-period",
        help="seconds of passing probes before an Unhealthy device "
        "is Healthy again; 0 = never (AIODP_HEALTH_RECOVERY_PERIOD) [300]",
    )
    add(
        "--max-file-bytes",
        help="largest config or simulated-devices file read (AIODP_MAX_FILE_BYTES) [1048576]",
    )
    add(
        "--node-signals",
        nargs="?",
        const="true",
        help="set the node condition GPUHealthy and Warning Events on GPU faults "
        "(AIODP_NODE_SIGNALS) [true]",
    )
    add("--gfd", nargs="?", const="true",
        help="write GPU Feature Discovery's node labels (AIODP_GFD) [false]")  # fmt: skip
    add("--use-node-feature-api", nargs="?", const="true",
        help="the labels as an NFD NodeFeature (GFD_USE_NODE_FEATURE_API) [true]")  # fmt: skip
    add("--no-timestamp", nargs="?", const="true",
        help="leave out nvidia.com/gfd.timestamp (GFD_NO_TIMESTAMP) [false]")  # fmt: skip
    add("--machine-type-file", help="source of nvidia.com/gpu.machine (GFD_MACHINE_TYPE_FILE) "
        "[/sys/class/dmi/id/product_name]")  # fmt: skip
    add("--namespace", help="namespace of the NodeFeature object (NAMESPACE) [default]")
    add(
        "--pod-resources-socket",
        help="kubelet pod-resources socket for pod labels, empty = off "
        f"(AIODP_POD_RESOURCES_SOCKET) [{DEFAULT_POD_RESOURCES_SOCKET}]",
    )
    add(
        "--device-metrics-interval",
        help="seconds between GPU counter readings for /metrics, 0 = off "
        "(AIODP_DEVICE_METRICS_INTERVAL) [10]",
    )
    add("--dra", nargs="?", const="true",
        help="also serve DRA: ResourceSlices, claims (AIODP_DRA) [false]")  # fmt: skip
    add("--dra-devices", help="GPUs served by DRA, not the device plugin: none, all or "
        "indexes/UUIDs (AIODP_DRA_DEVICES; file: dra.devices) [none]")  # fmt: skip
    add("--dra-driver-name", help="DRA driver name (AIODP_DRA_DRIVER_NAME) [gpu.aiodp.io]")
    add("--dra-registry-dir", help="kubelet plugin registry (AIODP_DRA_REGISTRY_DIR) "
        "[/var/lib/kubelet/plugins_registry]")  # fmt: skip
    add("--dra-plugins-dir", help="where <driver>/dra.sock goes (AIODP_DRA_PLUGINS_DIR) "
        "[/var/lib/kubelet/plugins]")  # fmt: skip
    add("--dra-cdi-dir", help="where claim CDI specs are written (AIODP_DRA_CDI_DIR) "
        "[/var/run/cdi]")  # fmt: skip
    add(
        "--shutdown-timeout",
        help="seconds to close streams, servers and the backend at exit "
        "(AIODP_SHUTDOWN_TIMEOUT) [10]",
    )
    return p


ENV: Final[Mapping[str, str | tuple[str, ...]]] = {
    "config_file": "CONFIG_FILE",
    "mig_strategy": "MIG_STRATEGY",
    "shared_devices_allocation_policy": "SHARED_DEVICES_ALLOCATION_POLICY",
    "mps_root": "MPS_ROOT",
    "mps_control": "AIODP_MPS_CONTROL",
    "mps_mount_shm": "AIODP_MPS_MOUNT_SHM",
    "nvidia_smi": "AIODP_NVIDIA_SMI",
    "kubelet_socket": "KUBELET_SOCKET",
    "backend": "AIODP_BACKEND",
    "simulated_devices": "AIODP_SIMULATED_DEVICES",
    "device_id_strategy": "DEVICE_ID_STRATEGY",
    "device_list_strategy": "DEVICE_LIST_STRATEGY",
    "pass_device_specs": "PASS_DEVICE_SPECS",
    "cdi_annotation_prefix": "CDI_ANNOTATION_PREFIX",
    "cdi_kind": "AIODP_CDI_KIND",
    "nvidia_driver_root": "NVIDIA_DRIVER_ROOT",
    "nvidia_dev_root": "NVIDIA_DEV_ROOT",
    "fail_on_init_error": "FAIL_ON_INIT_ERROR",
    "log_level": "AIODP_LOG_LEVEL",
    "log_format": "AIODP_LOG_FORMAT",
    "metrics_address": "AIODP_METRICS_ADDRESS",
    "health_interval": "AIODP_HEALTH_INTERVAL",
    "health_recovery_period": "AIODP_HEALTH_RECOVERY_PERIOD",
    "device_metrics_interval": "AIODP_DEVICE_METRICS_INTERVAL",
    "pod_resources_socket": "AIODP_POD_RESOURCES_SOCKET",
    "node_signals": "AIODP_NODE_SIGNALS",
    "gfd": "AIODP_GFD",
    "use_node_feature_api": ("GFD_USE_NODE_FEATURE_API", "USE_NODE_FEATURE_API"),
    "no_timestamp": "GFD_NO_TIMESTAMP",
    "machine_type_file": "GFD_MACHINE_TYPE_FILE",
    "namespace": "NAMESPACE",
    "shutdown_timeout": "AIODP_SHUTDOWN_TIMEOUT",
    "max_file_bytes": "AIODP_MAX_FILE_BYTES",
    "gdrcopy_enabled": "GDRCOPY_ENABLED",
    "gds_enabled": "GDS_ENABLED",
    "mofed_enabled": "MOFED_ENABLED",
    "imex_channel_ids": "IMEX_CHANNEL_IDS",
    "imex_required": "IMEX_REQUIRED",
    "device_discovery_strategy": "DEVICE_DISCOVERY_STRATEGY",
    "container_driver_root": ("DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT"),
    "nvidia_cdi_hook_path": ("NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH"),
    "cdi_feature_flags": "CDI_FEATURE_FLAGS",
    "cdi_disable_hooks": "CDI_DISABLE_HOOKS",
    "cdi_spec_dirs": "AIODP_CDI_SPEC_DIRS",
    "config_dir": ("AIODP_CONFIG_DIR", "CONFIG_FILE_SRCDIR"),
    "node_name": "NODE_NAME",
    "pod_uid": "AIODP_POD_UID",
    "node_label": "NODE_LABEL",
    "default_config": "DEFAULT_CONFIG",
    "fallback_strategies": "FALLBACK_STRATEGIES",
    "kubeconfig": "AIODP_KUBECONFIG",
    "dra": "AIODP_DRA",
    "dra_devices": "AIODP_DRA_DEVICES",
    "dra_driver_name": "AIODP_DRA_DRIVER_NAME",
    "dra_registry_dir": "AIODP_DRA_REGISTRY_DIR",
    "dra_plugins_dir": "AIODP_DRA_PLUGINS_DIR",
    "dra_cdi_dir": "AIODP_DRA_CDI_DIR",
}


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")
