"""Each command's --help lists its own flags, and --version is among them."""

from __future__ import annotations

import pytest

from aiodp.__main__ import main
from aiodp.config import resolve
from aiodp.kit.errors import ConfigError


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


def test_flags_each_command_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    serve = help_of(["--help"], capsys)
    assert help_of(["serve", "--help"], capsys) == serve
    demo = help_of(["demo", "--help"], capsys)
    status = help_of(["status", "--help"], capsys)
    assert len({serve, demo, status}) == 3
    for text in (serve, demo, status):
        assert "--version" in text
    assert "--mig-strategy" in serve
    assert "--kubelet-socket" in serve
    assert "--output" not in serve
    assert "--mig-strategy" in demo
    assert "--config-file" in demo
    assert "--kubelet-socket" not in demo
    assert "--simulated-devices" not in demo  # set by it
    assert "--output" in status
    assert "--metrics-address" in status
    assert "--mig-strategy" not in status
    assert len(status.splitlines()) < 30


def test_flags_a_flag_of_another_command_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--mig-strategy", "mixed"]) == 2
    err = capsys.readouterr().err
    assert "aiodp status: unrecognized arguments: --mig-strategy mixed" in err


def test_flags_version_answers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--version"]) == 0
    assert capsys.readouterr().out.startswith("aiodp ")


def test_flags_a_bad_boolean_names_the_words_taken() -> None:
    with pytest.raises(ConfigError) as err:
        resolve.resolve(["--pass-device-specs", "maybe"], {})
    assert str(err.value) == (
        "--pass-device-specs: invalid value 'maybe': must be a boolean: "
        "1, t, true, yes, on or 0, f, false, no, off (any case)"
    )
    assert resolve.resolve(["--pass-device-specs", "T"], {}).pass_device_specs is True
