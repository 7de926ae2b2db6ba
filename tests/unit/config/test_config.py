from __future__ import annotations

import re
from pathlib import Path

import pytest

from aiodp.config import resolve as config
from aiodp.kit.errors import ConfigError


def test_config_defaults_match_nvidia() -> None:
    c = config.resolve([], {})
    assert c.command == "serve"
    assert c.kubelet_socket == Path("/var/lib/kubelet/device-plugins/kubelet.sock")
    assert c.plugin_dir == Path("/var/lib/kubelet/device-plugins")
    assert c.backend == "auto"
    assert c.device_id_strategy == "uuid"
    assert c.device_list_strategy == ("envvar",)
    assert c.fail_on_init_error is True
    assert c.pass_device_specs is False
    assert c.cdi_annotation_prefix == "cdi.k8s.io/"
    assert c.metrics_address == ":8080"
    assert c.health_interval == 5.0
    assert c.dev_root == Path("/")


def test_config_flag_beats_env_beats_default() -> None:
    env = {"DEVICE_ID_STRATEGY": "index", "AIODP_HEALTH_INTERVAL": "2.5"}
    assert config.resolve([], env).device_id_strategy == "index"
    assert config.resolve([], env).health_interval == 2.5
    c = config.resolve(["--device-id-strategy", "uuid"], env)
    assert c.device_id_strategy == "uuid"
    assert c.health_interval == 2.5


@pytest.mark.parametrize(
    ("argv", "env", "field", "value"),
    [
        (["demo"], {}, "command", "demo"),
        (["--kubelet-socket", "/x/k.sock"], {}, "kubelet_socket", Path("/x/k.sock")),
        ([], {"KUBELET_SOCKET": "/y/k.sock"}, "kubelet_socket", Path("/y/k.sock")),
        (
            [],
            {"DEVICE_LIST_STRATEGY": "cdi-cri, envvar,cdi-cri"},
            "device_list_strategy",
            ("cdi-cri", "envvar"),
        ),
        (["--pass-device-specs"], {}, "pass_device_specs", True),
        ([], {"PASS_DEVICE_SPECS": "TRUE"}, "pass_device_specs", True),
        (["--fail-on-init-error=false"], {}, "fail_on_init_error", False),
        ([], {"FAIL_ON_INIT_ERROR": "0"}, "fail_on_init_error", False),
        ([], {"NVIDIA_DRIVER_ROOT": "/run/nvidia/driver"}, "dev_root", Path("/run/nvidia/driver")),
        ([], {"NVIDIA_DEV_ROOT": "/host"}, "dev_root", Path("/host")),
        (["--driver-root", "/d"], {}, "nvidia_driver_root", Path("/d")),
        ([], {"AIODP_METRICS_ADDRESS": ":8080"}, "metrics_address", ":8080"),
        ([], {"AIODP_METRICS_ADDRESS": ""}, "metrics_address", ""),
        ([], {"AIODP_LOG_LEVEL": "DEBUG"}, "log_level", "debug"),
        (["--cdi-kind", "example.com/gpu"], {}, "cdi_kind", "example.com/gpu"),
    ],
)
def test_config_values(argv: list[str], env: dict[str, str], field: str, value: object) -> None:
    c = config.resolve(argv, env)
    got = c.dev_root if field == "dev_root" else getattr(c, field)
    assert got == value


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--backend", "cuda"], {}, "--backend: invalid value 'cuda'"),
        ([], {"AIODP_BACKEND": "cuda"}, "AIODP_BACKEND: invalid value 'cuda'"),
        ([], {"DEVICE_LIST_STRATEGY": "envvar,files"}, "unknown strategy 'files'"),
        ([], {"DEVICE_LIST_STRATEGY": " , "}, "must name at least one strategy"),
        (["--health-interval", "0"], {}, "--health-interval: invalid value '0'"),
        (["--health-interval", "nan"], {}, "--health-interval: invalid value 'nan'"),
        (["--health-interval", "5s"], {}, "--health-interval: invalid value '5s'"),
        ([], {"AIODP_METRICS_ADDRESS": "8080"}, "AIODP_METRICS_ADDRESS: invalid value '8080'"),
        ([], {"AIODP_METRICS_ADDRESS": ":70000"}, "port in 1..65535"),
        ([], {"PASS_DEVICE_SPECS": "sometimes"}, "PASS_DEVICE_SPECS: invalid value 'sometimes'"),
        (["--cdi-kind", "gpu"], {}, "--cdi-kind: invalid value 'gpu'"),
        (["--kubelet-socket", ""], {}, "--kubelet-socket: invalid value ''"),
        (["--kubelet-socket", "/" + "d" * 120 + "/kubelet.sock"], {}, "too long for a unix socket"),
        (["--backend", "simulated"], {}, "needs --simulated-devices"),
        (["frobnicate"], {}, "invalid choice: 'frobnicate'"),
    ],
)
def test_config_errors_name_the_flag_and_value(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        config.resolve(argv, env)
    assert message in str(err.value)


def test_config_socket_path_derives_from_resource() -> None:
    c = config.resolve(["--kubelet-socket", "/k/kubelet.sock"], {})
    assert c.socket_path("nvidia.com/gpu") == Path("/k/aiodp-nvidia-gpu.sock")
    assert c.socket_path("nvidia.com/mig-1g.10gb") == Path("/k/aiodp-nvidia-mig-1g-10gb.sock")


def test_config_socket_path_carries_the_pods_tag() -> None:
    """Two plugin pods on one node (a surge upgrade) get different sockets."""
    env = {"AIODP_POD_UID": "5F1C2A9E-0b7d-4c1e-9a3f-2d6b8e0c4a71"}
    c = config.resolve(["--kubelet-socket", "/k/kubelet.sock"], env)
    assert c.socket_path("nvidia.com/gpu") == Path("/k/aiodp-nvidia-gpu-5f1c2a9e.sock")
    other = config.resolve(["--kubelet-socket", "/k/kubelet.sock", "--pod-uid", "0b7d4c1e"], env)
    assert other.socket_path("nvidia.com/gpu") == Path("/k/aiodp-nvidia-gpu-0b7d4c1e.sock")
    with pytest.raises(ConfigError, match="pod"):
        config.resolve(["--pod-uid", " "], {})


def test_config_is_frozen() -> None:
    c = config.resolve([], {})
    with pytest.raises(AttributeError):
        c.backend = "nvml"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("disable", "enable", "probes", "checks"),
    [
        (None, None, True, {79: True, 48: True, 13: False, 109: False}),
        ("all", None, False, {79: False, 13: False}),
        ("xids", None, True, {79: False}),
        ("79,94", None, True, {79: False, 94: False, 48: True, 13: False}),
        ("all", "79", False, {79: True, 48: False}),
        (None, "13, 31", True, {13: True, 31: True, 43: False}),
        (None, "all", True, {13: True, 109: True, 79: True}),  # every XID acts
        ("xids,94", "all", True, {13: True, 94: True}),
    ],
)
def test_config_health_policy_matches_nvidia(
    disable: str | None, enable: str | None, probes: bool, checks: dict[int, bool]
) -> None:
    env = {
        k: v
        for k, v in (("DP_DISABLE_HEALTHCHECKS", disable), ("DP_ENABLE_HEALTHCHECKS", enable))
        if v is not None
    }
    policy = config.resolve([], env).health_policy
    assert policy.probes is probes
    assert {x: policy.xid_is_critical(x) for x in checks} == checks


def test_config_health_malformed_items_are_ignored_with_a_note() -> None:
    """As NVIDIA's plugin: a bad item is skipped and logged, never a crash-loop."""
    c = config.resolve([], {"DP_DISABLE_HEALTHCHECKS": "79,abc", "DP_ENABLE_HEALTHCHECKS": "x, 48"})
    assert not c.health_policy.xid_is_critical(79)
    assert c.health_policy.xid_is_critical(48)
    assert c.notes == (
        "DP_DISABLE_HEALTHCHECKS: ignoring the malformed item 'abc'",
        "DP_ENABLE_HEALTHCHECKS: ignoring the malformed item 'x'",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AIODP_HEALTH_RECOVERY_PERIOD": "-1"}, "AIODP_HEALTH_RECOVERY_PERIOD: invalid value"),
    ],
)
def test_config_health_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.resolve([], env)


def test_config_recovery_period() -> None:
    assert config.resolve([], {}).health_recovery_period == 300
    assert config.resolve(["--health-recovery-period", "0"], {}).health_recovery_period == 0


def test_config_shutdown_timeout() -> None:
    assert config.resolve([], {}).shutdown_timeout == 10
    assert config.resolve(["--shutdown-timeout", "2.5"], {}).shutdown_timeout == 2.5
    assert config.resolve([], {"AIODP_SHUTDOWN_TIMEOUT": "3"}).shutdown_timeout == 3
    with pytest.raises(ConfigError, match="--shutdown-timeout: invalid value '0'"):
        config.resolve(["--shutdown-timeout", "0"], {})


@pytest.mark.parametrize("flag", ["--nvidia-dev-root", "--nvidia-driver-root", "--mps-root"])
@pytest.mark.parametrize("value", ["relative/root", "/host/../etc", "/host/./dev", "//host"])
def test_config_host_roots_must_be_absolute_and_normalised(flag: str, value: str) -> None:
    """These go into the runtime's host paths: `/host/../etc` would hand out /etc."""
    with pytest.raises(ConfigError, match=f"{flag}: invalid value '{re.escape(value)}'"):
        config.resolve([flag, value], {})


def test_config_host_roots_accepted() -> None:
    c = config.resolve(["--nvidia-dev-root", "/run/nvidia/driver/"], {})
    assert c.dev_root == Path("/run/nvidia/driver")
    assert config.resolve(["--nvidia-driver-root", "/"], {}).dev_root == Path("/")


def test_config_repeated_device_list_strategy_adds_up() -> None:
    argv = ["--device-list-strategy", "envvar", "--device-list-strategy", "cdi-annotations,cdi-cri"]
    assert config.resolve(argv, {}).device_list_strategy == (
        "envvar",
        "cdi-annotations",
        "cdi-cri",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("t", True), ("T", True), ("TRUE", True), ("True", True), ("true", True),
     ("0", False), ("f", False), ("F", False), ("FALSE", False), ("False", False)],
)  # fmt: skip
def test_config_booleans_take_go_parsebool(value: str, expected: bool) -> None:
    assert config.resolve([], {"PASS_DEVICE_SPECS": value}).pass_device_specs is expected
    assert config.resolve([f"--fail-on-init-error={value}"], {}).fail_on_init_error is expected


def test_config_nvidia_flags_and_aliases() -> None:
    c = config.resolve(
        ["--gdrcopy-enabled", "--imex-channel-ids=0", "--nvidia-ctk-path=/opt/ctk"],
        {"GDS_ENABLED": "true", "CONTAINER_DRIVER_ROOT": "/host", "CDI_DISABLE_HOOKS": "all"},
    )
    assert (c.gdrcopy_enabled, c.gds_enabled, c.mofed_enabled) == (True, True, False)
    assert c.imex_channel_ids == (0,)
    assert c.nvidia_cdi_hook_path == Path("/opt/ctk")
    assert c.container_driver_root == Path("/host")
    assert c.cdi_disable_hooks == ("all",)
    assert any(
        n.startswith("--nvidia-cdi-hook-path /opt/ctk: aiodp generates no CDI") for n in c.notes
    )
    with pytest.raises(ConfigError, match="--imex-channel-ids: invalid value '1'"):
        config.resolve(["--imex-channel-ids=1"], {})


def test_config_tegra_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="does not support Tegra"):
        config.resolve(["--device-discovery-strategy=tegra"], {})
    assert (
        config.resolve([], {"DEVICE_DISCOVERY_STRATEGY": "nvml"}).device_discovery_strategy
        == "nvml"
    )


def test_config_effective_line_names_every_origin() -> None:
    read = {
        "/x/c.yaml": "version: v1\nflags: {migStrategy: mixed, plugin: {passDeviceSpecs: true}}\n"
    }
    c = config.resolve(
        ["--config-file", "/x/c.yaml", "--device-id-strategy=index"],
        {"PASS_DEVICE_SPECS": "false"},
        read=lambda p: read[str(p)],
    )
    line = config.effective(c)
    assert "mig_strategy=mixed (config file flags.migStrategy)" in line
    assert "pass_device_specs=False (env PASS_DEVICE_SPECS)" in line
    assert "device_id_strategy=index (--device-id-strategy)" in line
    assert "health_interval=5.0 (default)" in line
    assert "\n" not in line


def test_config_start_up_line_is_short_and_names_what_changed() -> None:
    c = config.resolve(["--mig-strategy", "mixed"], {"PASS_DEVICE_SPECS": "true"})
    assert config.changed(c) == (
        "mig_strategy=mixed (--mig-strategy), pass_device_specs=True (env PASS_DEVICE_SPECS)"
    )
    assert config.changed(config.resolve([], {})) == "all settings at their defaults"
    argv = ["--log-level", "debug", "--health-interval", "7"]
    argv += ["--cdi-spec-dirs", "/" + "x" * 200, "--kubelet-socket", "/k/" + "y" * 150]
    argv += ["--node-name", "n" * 90, "--default-config", "d" * 90]
    line = config.changed(config.resolve(argv, {}))
    assert len(line) <= 240
    assert line.endswith("more")
    assert len(config.effective(config.resolve(argv, {}))) > 1000  # the DEBUG line has all
