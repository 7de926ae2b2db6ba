"""config-manager's pieces in process: settings from flags over the environment, the choice
of config, the link, the signal (tests/integration/test_config_manager.py runs the process)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from aiodp.kit.errors import ConfigError
from aiodp.ops import configmanager

BASE = {"NODE_NAME": "n1", "CONFIG_FILE_SRCDIR": "/src", "CONFIG_FILE_DST": "/dst/config.yaml"}


def test_flags_win_over_the_environment_and_empty_variables_are_unset() -> None:
    s = configmanager.parse(["--node-name", "flag-node"], {**BASE, "SIGNAL": "", "ONESHOT": ""})
    assert s.node_name == "flag-node"
    assert s.signal == signal.SIGHUP  # NVIDIA's default, as its init container leaves it ""
    assert s.oneshot is False
    assert s.node_label == "nvidia.com/device-plugin.config"
    assert s.process_to_signal == "nvidia-device-plugin"
    assert s.fallback_strategies == ()
    s = configmanager.parse([], {**BASE, "SIGNAL": "15", "SEND_SIGNAL": "true",
                                 "FALLBACK_STRATEGIES": "named, empty"})  # fmt: skip
    assert (s.signal, s.send_signal, s.fallback_strategies) == (15, True, ("named", "empty"))


def test_an_unknown_flag_or_a_bad_signal_is_named() -> None:
    with pytest.raises(ConfigError, match="unrecognized arguments: --nope"):
        configmanager.parse(["--nope"], BASE)
    with pytest.raises(ConfigError, match="SIGNAL: '999' is not a signal number"):
        configmanager.parse([], {**BASE, "SIGNAL": "999"})


def _settings(tmp_path: Path, **env: str) -> configmanager.Settings:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for name in ("a", "b", "..data"):
        (src / name).write_text(name)
    dst = str(tmp_path / "config.yaml")
    env = {"NODE_NAME": "n1", "CONFIG_FILE_SRCDIR": str(src), "CONFIG_FILE_DST": dst, **env}
    return configmanager.parse([], env)


def test_choose_follows_nvidias_order(tmp_path: Path) -> None:
    s = _settings(tmp_path, DEFAULT_CONFIG="b")
    assert configmanager.choose(s, "a") == "a"
    assert configmanager.choose(s, None) == "b"
    with pytest.raises(ConfigError, match="not among a, b"):  # ..data is the ConfigMap's own
        configmanager.choose(s, "c")
    assert configmanager.choose(_settings(tmp_path, FALLBACK_STRATEGIES="empty"), None) is None
    with pytest.raises(ConfigError, match="no config for this node"):
        configmanager.choose(_settings(tmp_path), None)


def test_point_replaces_the_link_and_reports_no_change(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    dst = tmp_path / "config.yaml"
    assert configmanager.point(s, "a") is True
    assert configmanager.point(s, "a") is False
    assert configmanager.point(s, "b") is True
    assert os.readlink(dst) == str(tmp_path / "src" / "b")
    assert configmanager.point(s, None) is True  # the empty config
    assert os.readlink(dst) == "/dev/null"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "src"]  # no leftovers


def test_apply_without_a_process_to_signal_is_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = _settings(tmp_path, SEND_SIGNAL="true", PROCESS_TO_SIGNAL="no-such-process-here")
    configmanager.apply(s, "a")
    assert "no process no-such-process-here to signal" in caplog.text
    assert os.readlink(tmp_path / "config.yaml").endswith("/a")
