"""What the plugin was asked to do: flags, environment and config file in one frozen Config.

Only this module interprets the environment; `__main__` hands `os.environ` to `resolve`.
Precedence: flag > environment variable > config file > default. The config file is read by
one function, `load`, at start, on every reload and in the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final, Literal, NoReturn, TypeVar, cast

from aiodp import configfile
from aiodp.errors import ConfigError, brief, cut, cut_text

RESOURCE_GPU: Final = "nvidia.com/gpu"
DEFAULT_KUBELET_SOCKET: Final = "/var/lib/kubelet/device-plugins/kubelet.sock"
DEFAULT_POD_RESOURCES_SOCKET: Final = "/var/lib/kubelet/pod-resources/kubelet.sock"

Command = Literal["serve", "demo", "status"]
BackendName = Literal["auto", "nvml", "simulated"]
IdStrategy = Literal["uuid", "index"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
ListStrategy = Literal["envvar", "volume-mounts", "cdi-annotations", "cdi-cri"]
MigStrategy = Literal["none", "single", "mixed"]
AllocationPolicy = Literal["distributed", "packed"]
DraSelector = Literal["none", "all"] | tuple[str, ...]
"""Which GPUs DRA serves: none, all, or these GPU indexes and UUIDs."""

LIST_STRATEGIES: Final[tuple[ListStrategy, ...]] = (
    "envvar",
    "volume-mounts",
    "cdi-annotations",
    "cdi-cri",
)


DEFAULT_IGNORED_XIDS: Final = frozenset({13, 31, 43, 45, 68, 109})
"""Application-level XIDs NVIDIA's plugin never acts on."""


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Which health checks act, from NVIDIA's DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS.

    `DP_DISABLE_HEALTHCHECKS=all` turns every check off (aiodp: XIDs and probes),
    `xids` turns XID checks off, a comma list of XIDs adds to the ignored ones;
    `DP_ENABLE_HEALTHCHECKS` lists XIDs that act whatever else says.
    """

    probes: bool = True
    xids: bool = True
    ignored_xids: frozenset[int] = DEFAULT_IGNORED_XIDS
    enabled_xids: frozenset[int] = frozenset()

    def xid_is_critical(self, xid: int) -> bool:
        if xid in self.enabled_xids:
            return True
        return self.xids and xid not in self.ignored_xids

    @property
    def watches_xids(self) -> bool:
        return self.xids or bool(self.enabled_xids)


ALL_XIDS: Final = frozenset(range(1, 1024))
"""`DP_ENABLE_HEALTHCHECKS=all`: every XID acts (XIDs are small numbers)."""


def _xid_items(name: str, value: str | None, notes: list[str]) -> tuple[set[str], set[int]]:
    """NVIDIA's parsing: comma items, `all` and `xids` as words, numbers as XIDs; a
    malformed item is ignored with a note (logged once at start), never an error."""
    words: set[str] = set()
    xids: set[int] = set()
    for raw in (value or "").split(","):
        item = raw.strip().lower()
        if not item:
            continue
        if item in ("all", "xids"):
            words.add(item)
        elif item.isdigit():
            xids.add(int(item))
        else:
            notes.append(f"{name}: ignoring the malformed item {cut(raw.strip())}")
    return words, xids


def health_policy(
    disable: str | None, enable: str | None, notes: list[str] | None = None
) -> HealthPolicy:
    """NVIDIA's two environment variables as one policy; like NVIDIA's, never an error."""
    notes = [] if notes is None else notes
    d_words, d_xids = _xid_items("DP_DISABLE_HEALTHCHECKS", disable, notes)
    e_words, e_xids = _xid_items("DP_ENABLE_HEALTHCHECKS", enable, notes)
    return HealthPolicy(
        probes="all" not in d_words,
        xids=not d_words,
        ignored_xids=DEFAULT_IGNORED_XIDS | d_xids,
        enabled_xids=ALL_XIDS if "all" in e_words else frozenset(e_xids),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything the plugin runs with; built once by `resolve`, never changed."""

    command: Command = "serve"
    config_file: Path | None = None
    """NVIDIA's `version: v1` config file; watched and applied live."""
    mig_strategy: MigStrategy = "none"
    """How MIG devices are advertised: not at all, as nvidia.com/gpu, or per profile."""
    shared_devices_allocation_policy: AllocationPolicy = "distributed"
    """Preferred allocation of replicas and MIG devices: spread over GPUs, or pack them."""
    mps_root: Path | None = None
    """Host directory of the MPS control daemon's pipes and shm (needed with sharing.mps)."""
    sharing: configfile.Sharing | None = None
    gpu_names: tuple[configfile.NamePattern, ...] = ()
    mig_names: tuple[configfile.NamePattern, ...] = ()
    ignored: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    """Config-file keys accepted and ignored (GFD and other NVIDIA-only settings)."""
    overrides: Mapping[str, object] = dataclasses.field(default_factory=dict, compare=False)
    """The settings given by flag or environment: they win over the config file on reload."""
    kubelet_socket: Path = Path(DEFAULT_KUBELET_SOCKET)
    """The kubelet's Registration socket; our own sockets go into its directory."""
    backend: BackendName = "auto"
    """Where devices come from: NVML, the simulated-devices file, or NVML when it loads."""
    simulated_devices: Path | None = None
    """YAML file of simulated GPUs (required with `--backend simulated`)."""
    device_id_strategy: IdStrategy = "uuid"
    """What `NVIDIA_VISIBLE_DEVICES` lists: GPU UUIDs (NVIDIA's default) or indexes."""
    device_list_strategy: tuple[ListStrategy, ...] = ("envvar",)
    """How Allocate hands devices to the runtime (NVIDIA's DEVICE_LIST_STRATEGY)."""
    pass_device_specs: bool = False
    """Add DeviceSpecs for the device nodes (needed with the CPU manager's static policy)."""
    cdi_annotation_prefix: str = "cdi.k8s.io/"
    cdi_kind: str = "nvidia.com/gpu"
    """CDI vendor/class of device names, the kind nvidia-ctk's generated spec uses."""
    nvidia_driver_root: Path = Path("/")
    nvidia_dev_root: Path | None = None
    """Root of the /dev tree holding the device nodes; None means the driver root."""
    fail_on_init_error: bool = True
    """Exit when the backend cannot start (NVIDIA's default) instead of waiting for it."""
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    metrics_address: str = ":8080"
    """HOST:PORT of /metrics, /healthz and /readyz (":PORT": every address); empty: off."""
    health_interval: float = 5.0
    """Seconds between health probes (a change in the simulated file is seen at once)."""
    health_recovery_period: float = 300.0
    """Seconds of passing probes, with no new critical event, before an Unhealthy device is
    Healthy again; 0 never brings it back (NVIDIA's behaviour)."""
    device_metrics_interval: float = 10.0
    """Seconds between readings of the GPUs' counters for /metrics; 0 turns them off."""
    node_signals: bool = True
    """On a critical XID or a lost GPU, set the node condition GPUHealthy and record Events
    (needs NODE_NAME and API access)."""
    pod_resources_socket: Path | None = Path(DEFAULT_POD_RESOURCES_SOCKET)
    """The kubelet's pod-resources socket, read to label GPU metrics by pod; None = off."""
    health_policy: HealthPolicy = HealthPolicy()
    """XIDs that act and whether probes run (DP_DISABLE_HEALTHCHECKS, DP_ENABLE_HEALTHCHECKS)."""
    proc_root: Path = Path("/proc")
    """Where /proc is: MIG capability device minors are read under driver/nvidia/."""
    sys_root: Path = Path("/sys")
    """Where /sys is: a GPU's NUMA node is read from bus/pci/devices/<bdf>/numa_node."""
    gdrcopy_enabled: bool = False
    """NVIDIA_GDRCOPY=enabled in every Allocate answer (NVIDIA's --gdrcopy-enabled)."""
    gds_enabled: bool = False
    """NVIDIA_GDS=enabled in every Allocate answer."""
    mofed_enabled: bool = False
    """NVIDIA_MOFED=enabled in every Allocate answer."""
    imex_channel_ids: tuple[int, ...] = ()
    """IMEX channels handed to every container (NVIDIA allows none or channel 0)."""
    imex_required: bool = False
    """Exit at start when a configured IMEX channel's device node is missing."""
    device_discovery_strategy: Literal["auto", "nvml", "tegra"] = "auto"
    """How NVIDIA's plugin finds GPUs; aiodp uses NVML, and refuses tegra (exit 2)."""
    container_driver_root: Path = Path("/driver-root")
    """Where the host driver root is mounted in this container (NVIDIA's chart mounts it);
    accepted for compatibility, aiodp reads device nodes under --nvidia-dev-root."""
    nvidia_cdi_hook_path: Path = Path("/usr/bin/nvidia-ctk")
    """nvidia-cdi-hook for a generated CDI spec; accepted, aiodp generates no spec."""
    cdi_feature_flags: tuple[str, ...] = ()
    """NVIDIA's CDI generation feature flags; accepted, aiodp generates no spec."""
    cdi_disable_hooks: tuple[str, ...] = ()
    """OCI hooks left out of a generated CDI spec; accepted, aiodp generates no spec."""
    config_dir: Path | None = None
    """A mounted ConfigMap of named configs: the node's label picks one (NVIDIA's
    config-manager, done in our loop); `config_file` is then the chosen one."""
    node_name: str = ""
    """This node (the chart sets NODE_NAME from the pod's spec.nodeName)."""
    node_label: str = "nvidia.com/device-plugin.config"
    default_config: str = ""
    """The config of a node without the label (NVIDIA's config.default)."""
    fallback_strategies: tuple[str, ...] = ("named", "single")
    """Without a label or a default: a config named "default", then the only config."""
    kubeconfig: Path | None = None
    """A kubeconfig outside a pod; in a pod the service account is used."""
    api_timeout: float = 5.0
    """Seconds one API read may take at start before the default config is used."""
    output: Literal["table", "json", "yaml"] = dataclasses.field(default="table", compare=False)
    """How `aiodp status` prints."""
    dra: bool = False
    """Also serve the kubelet's Dynamic Resource Allocation API (a DRA kubelet plugin with
    ResourceSlices) from this process, for the GPUs `dra_devices` selects."""
    dra_devices: DraSelector = "none"
    """Which GPUs DRA serves instead of the device plugin: none, all, or GPU indexes and
    UUIDs (the config file's `dra.devices`, applied live). A GPU is never on both APIs."""
    dra_driver_name: str = "gpu.aiodp.io"
    """The DRA driver name (ResourceSlices, DeviceClass, CDI kind); NVIDIA's DRA driver is
    gpu.nvidia.com: two drivers must never publish the same GPUs."""
    dra_registry_dir: Path = Path("/var/lib/kubelet/plugins_registry")
    """The kubelet's plugin-watcher directory: our `<driver>-reg.sock` goes there."""
    dra_plugins_dir: Path = Path("/var/lib/kubelet/plugins")
    """Our DRA socket and claim checkpoint live in `<dir>/<driver>/`."""
    dra_cdi_dir: Path = Path("/var/run/cdi")
    """Where one transient CDI spec per prepared claim is written (and removed)."""
    cdi_spec_dirs: tuple[Path, ...] = (Path("/etc/cdi"), Path("/var/run/cdi"))
    """Where the node's CDI specs are; with a CDI strategy every name we hand out must be
    defined there (else /readyz is 503 and one line says how to create the spec)."""
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)
    """Where each setting came from: the flag, the variable, the config file key, default."""
    """What the settings made aiodp do differently or ignore: logged once at start."""
    max_file_bytes: int = configfile.MAX_FILE_BYTES
    """Largest config or simulated-devices file read (bytes): real ones are a few KiB, and a
    huge one must not stall or bloat the plugin."""
    shutdown_timeout: float = 10.0
    """Seconds to close streams, servers and the device backend at exit; below the pod's
    termination grace period (30 s by default), so the kubelet never has to kill us."""
    register_timeout: float = 30.0
    """Deadline of one Register call: the kubelet dials back inside it (10 s dial)."""
    register_backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
    """Waits between Register attempts, the last one repeated, with +-20 % jitter."""
    stream_open_timeout: float = 10.0
    """How long after Register we wait for the kubelet's ListAndWatch before re-registering."""
    resettle_delay: float = 0.1
    """Pause between ending our streams and registering again with a live kubelet."""

    @property
    def plugin_dir(self) -> Path:
        """The device-plugins directory: the kubelet socket's directory."""
        return self.kubelet_socket.parent

    @property
    def dev_root(self) -> Path:
        return self.nvidia_dev_root if self.nvidia_dev_root is not None else self.nvidia_driver_root

    @property
    def dra_socket(self) -> Path:
        """Our DRA service socket, the endpoint GetInfo names."""
        return self.dra_plugins_dir / self.dra_driver_name / "dra.sock"

    @property
    def dra_registration_socket(self) -> Path:
        """Where the kubelet's plugin watcher finds us."""
        return self.dra_registry_dir / f"{self.dra_driver_name}-reg.sock"

    @property
    def dra_checkpoint(self) -> Path:
        """The prepared claims, so that an unprepare after a restart still cleans up."""
        return self.dra_plugins_dir / self.dra_driver_name / "claims.json"

    MAX_SOCKET_PATH: ClassVar[int] = 107
    """Bytes in an AF_UNIX path (sun_path is 108 with the NUL)."""

    def socket_path(self, resource: str) -> Path:
        """Our socket for a resource: `nvidia.com/gpu` -> `aiodp-nvidia-gpu.sock`."""
        name = resource.replace("nvidia.com/", "nvidia-").replace("/", "-").replace(".", "-")
        return self.plugin_dir / f"aiodp-{name}.sock"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


T = TypeVar("T")


def _parser() -> _Parser:
    p = _Parser(prog="aiodp", description="Kubernetes device plugin for NVIDIA GPUs")
    p.add_argument("command", nargs="?", choices=("serve", "demo", "status"), default=None)
    p.add_argument("--output", "-o", choices=("table", "json", "yaml"), default="table",
                   help="aiodp status: how to print [table]")  # fmt: skip
    add = p.add_argument
    add("--config-file", help="NVIDIA's version: v1 config file, applied live (CONFIG_FILE)")
    add("--mig-strategy", help="none|single|mixed (MIG_STRATEGY) [none]")
    add(
        "--shared-devices-allocation-policy",
        help="distributed|packed (SHARED_DEVICES_ALLOCATION_POLICY) [distributed]",
    )
    add("--mps-root", help="host directory of the MPS daemon's pipes (MPS_ROOT)")
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


_ENV: Final[Mapping[str, str | tuple[str, ...]]] = {
    "config_file": "CONFIG_FILE",
    "mig_strategy": "MIG_STRATEGY",
    "shared_devices_allocation_policy": "SHARED_DEVICES_ALLOCATION_POLICY",
    "mps_root": "MPS_ROOT",
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


# Each parser takes a flag's or variable's string, or a config file's typed YAML value
# (a bool, a number, a list), and returns the typed setting; ValueError says what is wrong.


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _choice(choices: Sequence[str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        v = value.strip().lower() if isinstance(value, str) else None
        if v is None or v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return v

    return parse


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    v = _text(value).strip().lower()
    if v in ("1", "t", "true", "yes", "on"):  # Go's strconv.ParseBool, and yes/on
        return True
    if v in ("0", "f", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, int | float):
        return float(value)
    return float(_text(value))


def _seconds(value: object) -> float:
    v = _number(value)
    if not v > 0 or v != v or v == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return v


def _period(value: object) -> float:
    v = _number(value)
    if not v >= 0 or v == float("inf"):
        raise ValueError("must be a number of seconds >= 0 (0: never recover)")
    return v


def _list_strategy(value: object) -> tuple[ListStrategy, ...]:
    raw = [_text(v) for v in value] if isinstance(value, list | tuple) else _text(value).split(",")
    items = [s.strip().lower() for s in raw if s.strip()]
    if not items:
        raise ValueError("must name at least one strategy")
    for s in items:
        if s not in LIST_STRATEGIES:
            raise ValueError(
                f"unknown strategy {cut(s)}; must be among {', '.join(LIST_STRATEGIES)}"
            )
    return tuple(dict.fromkeys(cast(list[ListStrategy], items)))


def _file_bytes(value: object) -> int:
    if isinstance(value, bool | float):
        raise ValueError("must be a whole number of bytes")
    try:
        v = value if isinstance(value, int) else int(_text(value).strip())
    except ValueError:
        raise ValueError("must be a whole number of bytes") from None
    if not 1024 <= v <= 64 << 20:
        raise ValueError("must be between 1024 and 67108864 bytes")
    return v


def _words(value: object) -> tuple[str, ...]:
    """A comma list (flag, repeated flag, variable) or a YAML list of words."""
    raw = [_text(v) for v in value] if isinstance(value, list | tuple) else _text(value).split(",")
    return tuple(dict.fromkeys(w.strip() for w in raw if w.strip()))


def _fallbacks(value: object) -> tuple[str, ...]:
    items = _words(value)
    for item in items:
        if item not in ("named", "single", "empty"):
            raise ValueError(f"unknown strategy {cut(item)}; must be among named, single, empty")
    return items


def _paths(value: object) -> tuple[Path, ...]:
    return tuple(Path(w) for w in _words(value))


def _imex_channels(value: object) -> tuple[int, ...]:
    """NVIDIA accepts no channel or channel 0."""
    if isinstance(value, list | tuple):
        items = list(value)
    else:
        items = [v for v in _text(value).split(",") if v.strip()]
    try:
        ids = tuple(dict.fromkeys(int(str(v).strip()) for v in items))
    except ValueError:
        raise ValueError("must be a list of channel numbers") from None
    if ids not in ((), (0,)):
        raise ValueError("must be empty or 0 (one IMEX channel per node)")
    return ids


def _address(value: object) -> str:
    v = _text(value).strip()
    if not v:
        return ""
    _, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT or :PORT with a port in 1..65535")
    return v


def _nonempty(value: object) -> str:
    v = _text(value)
    if not v.strip():
        raise ValueError("must not be empty")
    return v.strip()


def _path(value: object) -> Path:
    return Path(_nonempty(value))


def _optional_path(value: object) -> Path | None:
    """A path, or None (off) when empty."""
    if isinstance(value, str) and not value.strip():
        return None
    return Path(_nonempty(value))


def _host_root(value: object) -> Path:
    """A host directory that goes into DeviceSpec and Mount host paths: absolute and
    normalised, so that `relative/root` or `/host/../etc` cannot point anywhere else."""
    v = _nonempty(value)
    if not v.startswith("/"):
        raise ValueError("must be an absolute path")
    if v != "/" and (os.path.normpath(v) != v.rstrip("/") or "//" in v):
        raise ValueError("must be a normalised path (no '.', '..' or '//')")
    return Path(v)


def _cdi_kind(value: object) -> str:
    v = _nonempty(value)
    vendor, sep, cls = v.partition("/")
    if not sep or not vendor or not cls or "=" in v:
        raise ValueError("must be a CDI kind vendor/class, e.g. nvidia.com/gpu")
    return v


_DNS_SUBDOMAIN: Final = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


def _driver_name(value: object) -> str:
    v = _nonempty(value)
    if len(v) > 63 or not _DNS_SUBDOMAIN.match(v) or "." not in v:
        raise ValueError("must be a DNS subdomain of at most 63 characters, e.g. gpu.aiodp.io")
    return v


MAX_DRA_SELECTORS: Final = 1024


def _dra_devices(value: object) -> DraSelector:
    """none, all, or GPU indexes / UUIDs (a comma list, or a YAML list in the file)."""
    items: list[object]
    if isinstance(value, str):
        if value.strip() in ("none", "all"):
            return cast(DraSelector, value.strip())
        items = [w for w in value.split(",") if w.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError("must be none, all, or a list of GPU indexes or UUIDs")
    if not items or len(items) > MAX_DRA_SELECTORS:
        raise ValueError(f"must list 1 to {MAX_DRA_SELECTORS} GPUs (or say none or all)")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise ValueError(f"{cut(item)} is not a GPU index or UUID")
        text = str(item).strip()
        if not text or len(text) > 128:
            raise ValueError(f"{cut(item)} is not a GPU index or UUID")
        out.append(text)
    return tuple(dict.fromkeys(out))


_PARSERS: Final[Mapping[str, Callable[[object], object]]] = {
    "config_file": _path,
    "mig_strategy": _choice(("none", "single", "mixed")),
    "shared_devices_allocation_policy": _choice(("distributed", "packed")),
    "mps_root": _host_root,
    "kubelet_socket": _path,
    "backend": _choice(("auto", "nvml", "simulated")),
    "simulated_devices": _path,
    "device_id_strategy": _choice(("uuid", "index")),
    "device_list_strategy": _list_strategy,
    "pass_device_specs": parse_bool,
    "cdi_annotation_prefix": _nonempty,
    "cdi_kind": _cdi_kind,
    "nvidia_driver_root": _host_root,
    "nvidia_dev_root": _host_root,
    "fail_on_init_error": parse_bool,
    "log_level": _choice(("debug", "info", "warning", "error")),
    "log_format": _choice(("text", "json")),
    "metrics_address": _address,
    "health_interval": _seconds,
    "health_recovery_period": _period,
    "device_metrics_interval": _period,
    "pod_resources_socket": _optional_path,
    "node_signals": parse_bool,
    "shutdown_timeout": _seconds,
    "max_file_bytes": _file_bytes,
    "gdrcopy_enabled": parse_bool,
    "gds_enabled": parse_bool,
    "mofed_enabled": parse_bool,
    "imex_channel_ids": _imex_channels,
    "imex_required": parse_bool,
    "device_discovery_strategy": _choice(("auto", "nvml", "tegra")),
    "container_driver_root": _host_root,
    "nvidia_cdi_hook_path": _path,
    "cdi_feature_flags": _words,
    "cdi_disable_hooks": _words,
    "cdi_spec_dirs": _paths,
    "config_dir": _path,
    "node_name": _nonempty,
    "node_label": _nonempty,
    "default_config": _text,
    "fallback_strategies": _fallbacks,
    "kubeconfig": _path,
    "dra": parse_bool,
    "dra_devices": _dra_devices,
    "dra_driver_name": _driver_name,
    "dra_registry_dir": _path,
    "dra_plugins_dir": _path,
    "dra_cdi_dir": _path,
}


def named_configs(config_dir: Path) -> list[str]:
    """The named configs in a mounted ConfigMap directory (its keys; `..data` and the dated
    directories are the volume's own). Blocking: a listdir."""
    try:
        names = sorted(p.name for p in config_dir.iterdir())
    except OSError:
        return []
    return [n for n in names if not n.startswith(".")]


def labelled_config_path(running: Config, label: str | None) -> Path | None:
    """The file in `running.config_dir` that the node's label names, by NVIDIA's default and
    fallbacks (ConfigError when none fits); reads the directory."""
    assert running.config_dir is not None
    chosen = choose_config(
        label, named_configs(running.config_dir), running.default_config,
        running.fallback_strategies,
    )  # fmt: skip
    return None if chosen is None else running.config_dir / chosen


def with_labelled_config(running: Config, path: Path | None) -> Config:
    """The running flags and environment over the config file a node label chose (read,
    bounded); used at start and on every relabel."""
    file = None if path is None else load(path, limit=running.max_file_bytes)
    sources = {**running.sources, "config_file": f"node label {running.node_label}"}
    return build(
        {**running.overrides, "config_file": path}, file, command=running.command, sources=sources
    )


def choose_config(
    label: str | None, names: Sequence[str], default: str, fallbacks: Sequence[str]
) -> str | None:
    """NVIDIA's choice of config (pure): the label's, else `default`, else the fallbacks in
    order (`named`: a config called "default"; `single`: the only one; `empty`: none, which
    returns None). Raises ConfigError naming what is missing."""
    if label:
        if label in names:
            return label
        raise ConfigError(f"node label names config {cut_text(label)!r}, not among {brief(names)}")
    if default:
        if default in names:
            return default
        raise ConfigError(f"the default config {default!r} is not among {brief(names)}")
    for strategy in fallbacks:
        if strategy == "named" and "default" in names:
            return "default"
        if strategy == "single" and len(names) == 1:
            return names[0]
        if strategy == "empty":
            return None
    raise ConfigError(
        f"no config for this node: no label, no default config, and the fallbacks "
        f"({', '.join(fallbacks)}) find none among {brief(names)}"
    )


def resolve(
    argv: Sequence[str],
    environ: Mapping[str, str],
    read: Callable[[Path], str] | None = None,
) -> Config:
    """Flags over environment over the config file over defaults.

    `read` reads the config file (tests pass a dict lookup); a ConfigError names the flag,
    variable or key path and the value.
    """
    ns = _parser().parse_args(list(argv))
    overrides: dict[str, object] = {}
    sources: dict[str, str] = {}
    notes: list[str] = []
    for key, envs in _ENV.items():
        raw = getattr(ns, key)
        if isinstance(raw, list):  # a repeated flag: its values add up, as NVIDIA's do
            raw = ",".join(raw)
        source = flag_name(key)
        for env in (envs,) if isinstance(envs, str) else envs:
            if raw is None and env in environ:
                raw, source = environ[env], env
        if raw is None:
            continue
        try:
            overrides[key] = _PARSERS[key](raw)
        except ValueError as e:
            raise ConfigError(f"{source}: invalid value {cut(raw)}: {e}") from None
        sources[key] = source if source.startswith("--") else f"env {source}"
    overrides["health_policy"] = health_policy(
        environ.get("DP_DISABLE_HEALTHCHECKS"), environ.get("DP_ENABLE_HEALTHCHECKS"), notes
    )
    overrides["notes"] = tuple(notes)
    command: Command = ns.command or "serve"
    path = overrides.get("config_file")
    config_dir = overrides.get("config_dir")
    if isinstance(config_dir, Path):  # the label is not known yet: the default for now
        if "config_file" in overrides:
            raise ConfigError("--config-file and --config-dir: give one of them")
        default = Config()
        chosen = choose_config(
            None,
            named_configs(config_dir),
            str(overrides.get("default_config", default.default_config)),
            cast(
                tuple[str, ...], overrides.get("fallback_strategies", default.fallback_strategies)
            ),
        )
        overrides["config_file"] = None if chosen is None else config_dir / chosen
        sources["config_file"] = f"{config_dir} (default for a node without the label)"
    limit = overrides.get("max_file_bytes", configfile.MAX_FILE_BYTES)
    assert isinstance(limit, int)
    file = load(path, read, limit=limit) if isinstance(path, Path) else None
    config = build(overrides, file, command=command, sources=sources)
    return dataclasses.replace(config, output=ns.output) if ns.output != "table" else config


def effective(config: Config) -> str:
    """Every setting with its value and origin, in one line (NVIDIA's "Running with
    config"): `mig_strategy=none (default), pass_device_specs=True (env PASS_DEVICE_SPECS)`."""
    parts = []
    for key in _PARSERS:
        value = getattr(config, key)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        parts.append(f"{key}={cut_text(str(value))} ({config.sources.get(key, 'default')})")
    return ", ".join(parts)


def load(
    path: Path,
    read: Callable[[Path], str] | None = None,
    *,
    limit: int = configfile.MAX_FILE_BYTES,
) -> configfile.ConfigFile:
    """Read (at most `limit` bytes) and parse the config file: at start, on every reload, in
    the tests.

    Blocking (a file read and a parse): the running plugin calls it in a thread. A
    ConfigError names the file and the key path and value.
    """
    try:
        text = read(path) if read is not None else configfile.read_bounded(path, limit)
        return configfile.parse(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    except configfile.ConfigFileError as e:
        raise ConfigError(f"{path}: {e}") from None


def build(
    overrides: Mapping[str, object],
    file: configfile.ConfigFile | None,
    *,
    command: Command = "serve",
    sources: Mapping[str, str] | None = None,
) -> Config:
    """One Config from flag/env values and a parsed config file (file values lose).

    `sources` says where each override came from (the flag or variable), for the start-up
    line that lists every setting with its origin."""
    values: dict[str, object] = {}
    origin = {key: "default" for key in _PARSERS}
    if file is not None:
        origin.update({key: f"config file {where}" for key, (where, _) in file.flags.items()})
        for key, (where, raw) in file.flags.items():
            try:
                values[key] = _PARSERS[key](raw)
            except ValueError as e:
                raise ConfigError(f"{where}: invalid value {cut(raw)}: {e}") from None
        values.update(
            sharing=file.sharing,
            gpu_names=file.gpu_names,
            mig_names=file.mig_names,
            ignored=file.ignored,
        )
    values.update(overrides)
    origin.update({k: (sources or {}).get(k, "flag or env") for k in overrides if k in origin})
    values["sources"] = origin
    values["command"] = command
    values["overrides"] = {k: v for k, v in overrides.items() if k != "notes"}
    config = validate(Config(**values))  # type: ignore[arg-type]
    inert = inert_settings(config)
    return dataclasses.replace(config, notes=config.notes + inert) if inert else config


def inert_settings(config: Config) -> tuple[str, ...]:
    """NVIDIA settings that are set but mean nothing here, each with what aiodp does."""
    out = []
    default = Config()
    no_spec = "aiodp generates no CDI spec (the node's own spec is used), so it has no effect"
    if config.nvidia_cdi_hook_path != default.nvidia_cdi_hook_path:
        out.append(f"--nvidia-cdi-hook-path {config.nvidia_cdi_hook_path}: {no_spec}")
    if config.cdi_feature_flags:
        out.append(f"--cdi-feature-flags {','.join(config.cdi_feature_flags)}: {no_spec}")
    if config.cdi_disable_hooks:
        out.append(f"--cdi-disable-hooks {','.join(config.cdi_disable_hooks)}: {no_spec}")
    if config.container_driver_root != default.container_driver_root:
        out.append(
            f"--driver-root-ctr-path {config.container_driver_root}: accepted; aiodp looks "
            f"for device nodes under --nvidia-dev-root ({config.dev_root})"
        )
    return tuple(out)


def validate(config: Config) -> Config:
    """Cross-field checks; returns the config unchanged or raises ConfigError."""
    if config.device_discovery_strategy == "tegra":
        raise ConfigError(
            "--device-discovery-strategy: invalid value 'tegra': aiodp finds GPUs with NVML "
            "and does not support Tegra (integrated) GPUs; run NVIDIA's plugin on Tegra nodes"
        )
    if config.backend == "simulated" and config.simulated_devices is None:
        raise ConfigError(
            "--backend: invalid value 'simulated': needs --simulated-devices "
            "(AIODP_SIMULATED_DEVICES)"
        )
    if len(str(config.socket_path(RESOURCE_GPU))) > config.MAX_SOCKET_PATH:
        raise ConfigError(
            f"--kubelet-socket: invalid value {cut(str(config.kubelet_socket))}: "
            "the directory is too long for a unix socket path (107 bytes)"
        )
    for sock, what in ((config.dra_socket, "--dra-plugins-dir"),
                       (config.dra_registration_socket, "--dra-registry-dir")):  # fmt: skip
        if config.dra and len(str(sock)) > config.MAX_SOCKET_PATH:
            raise ConfigError(
                f"{what}: invalid value {cut(str(sock.parent))}: {sock} is longer than "
                f"{config.MAX_SOCKET_PATH} bytes, the limit of a unix socket path"
            )
    if config.sharing is not None and config.sharing.method == "mps":
        if config.mps_root is None:
            raise ConfigError("sharing.mps: needs flags.mpsRoot (--mps-root, MPS_ROOT)")
        if config.mig_strategy == "mixed":
            raise ConfigError("sharing.mps: cannot be combined with migStrategy mixed")
    return config
