"""The README's table of NVIDIA's flags and variables: every "same" row, through the parser."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from aiodp.config import resolve as config

README = Path(__file__).resolve().parents[3] / "README.md"

SAMPLES: dict[str, tuple[str, str, Any]] = {
    # flag: (a value NVIDIA accepts, the Config attribute, what it becomes)
    "--mig-strategy": ("mixed", "mig_strategy", "mixed"),
    "--fail-on-init-error": ("false", "fail_on_init_error", False),
    "--nvidia-driver-root": (
        "/run/nvidia/driver",
        "nvidia_driver_root",
        Path("/run/nvidia/driver"),
    ),
    "--nvidia-dev-root": ("/run/nvidia/dev", "nvidia_dev_root", Path("/run/nvidia/dev")),
    "--pass-device-specs": ("true", "pass_device_specs", True),
    "--device-list-strategy": ("volume-mounts", "device_list_strategy", ("volume-mounts",)),
    "--device-id-strategy": ("index", "device_id_strategy", "index"),
    "--gdrcopy-enabled": ("True", "gdrcopy_enabled", True),
    "--gds-enabled": ("1", "gds_enabled", True),
    "--mofed-enabled": ("t", "mofed_enabled", True),
    "--cdi-annotation-prefix": ("example.com/", "cdi_annotation_prefix", "example.com/"),
    "--mps-root": ("/run/nvidia/mps", "mps_root", Path("/run/nvidia/mps")),
    "--shared-devices-allocation-policy": ("packed", "shared_devices_allocation_policy", "packed"),
    "--imex-channel-ids": ("0", "imex_channel_ids", (0,)),
    "--imex-required": ("true", "imex_required", True),
    "--kubelet-socket": ("/k/kubelet.sock", "kubelet_socket", Path("/k/kubelet.sock")),
    "--config-file": ("/x/config.yaml", "config_file", Path("/x/config.yaml")),
}


def same_rows() -> list[tuple[str, list[str], list[str]]]:
    """(flag, its aliases, its variables) of every row whose verdict starts with "same"."""
    section = README.read_text().split("### NVIDIA's flags and variables", 1)[1].split("\n### ")[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`--") or not cells[2].startswith("same"):
            continue
        flags = re.findall(r"`(--[a-z-]+)`", cells[0])
        envs = re.findall(r"`([A-Z_]+)`", cells[1])
        rows.append((flags[0], flags[1:], envs))
    return rows


def test_nvidia_flags_table_has_the_rows() -> None:
    assert {flag for flag, _, _ in same_rows()} == set(SAMPLES)


@pytest.mark.parametrize(("flag", "aliases", "envs"), same_rows(), ids=lambda v: str(v))
def test_nvidia_flags_same_rows_parse_as_nvidia(
    flag: str, aliases: list[str], envs: list[str]
) -> None:
    value, attr, expected = SAMPLES[flag]

    def read(path: Path) -> str:
        return "version: v1\n"  # --config-file's sample names a file: this is its content

    for name in (flag, *aliases):
        assert getattr(config.resolve([f"{name}={value}"], {}, read=read), attr) == expected
    for env in envs:
        assert getattr(config.resolve([], {env: value}, read=read), attr) == expected
