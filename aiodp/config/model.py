"""What the plugin runs with: the frozen Config, its policy types and defaults (units and
why each default in each field's docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final, Literal

from aiodp.config import configfile
from aiodp.kit.errors import cut

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
    nvidia_smi: str = "nvidia-smi"
    """nvidia-smi (on PATH, or a path): a DRA claim's TimeSlicing interval is set with it, as
    NVIDIA's DRA driver does."""
    mps_mount_shm: bool = True
    """Mount a tmpfs at `<mpsRoot>/shm` for the MPS clients' /dev/shm (NVIDIA's daemon does);
    false where the host provides it. Needs CAP_SYS_ADMIN."""
    mps_control: str = "nvidia-cuda-mps-control"
    """The MPS control binary (found on PATH, or a path): the plugin runs one daemon per MPS
    resource with it."""
    sharing: configfile.Sharing | None = None
    gpu_names: tuple[configfile.NamePattern, ...] = ()
    mig_names: tuple[configfile.NamePattern, ...] = ()
    ignored: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    """Config-file keys accepted and ignored (GFD and other NVIDIA-only settings)."""
    unknown: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    """Config-file keys outside NVIDIA's schema: ignored with a WARNING each, as NVIDIA's
    plugin ignores them."""
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
    gfd: bool = False
    """Write GPU Feature Discovery's `nvidia.com/*` node labels (needs NODE_NAME and API
    access), as NVIDIA's chart does with `gfd.enabled`; off by default, as there."""
    use_node_feature_api: bool = True
    """Publish the labels as an NFD NodeFeature object where the NFD API is served (GFD's
    default since v0.19); otherwise, or when off, patch the node's labels directly."""
    no_timestamp: bool = False
    """Leave out `nvidia.com/gfd.timestamp` (GFD's --no-timestamp)."""
    machine_type_file: Path = Path("/sys/class/dmi/id/product_name")
    """Where `nvidia.com/gpu.machine` is read from (GFD's --machine-type-file)."""
    namespace: str = "default"
    """The namespace of the NodeFeature object (GFD's NAMESPACE: the pod's own)."""
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
    pod_uid: str = ""
    """This plugin pod's UID (the chart sets AIODP_POD_UID): its first 8 letters and digits
    tag our socket names, so that during a surge upgrade the old and the new pod of one node
    each have their own socket (the kubelet keys endpoints by socket path from 1.37)."""
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
        """Our socket for a resource: `nvidia.com/gpu` -> `aiodp-nvidia-gpu.sock`, with the
        pod's tag: `aiodp-nvidia-gpu-5f1c2a9e.sock`."""
        name = resource.replace("nvidia.com/", "nvidia-").replace("/", "-").replace(".", "-")
        tag = "".join(c for c in self.pod_uid if c.isascii() and c.isalnum())[:8].lower()
        return self.plugin_dir / (f"aiodp-{name}-{tag}.sock" if tag else f"aiodp-{name}.sock")
