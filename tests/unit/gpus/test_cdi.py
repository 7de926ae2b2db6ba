"""The node's CDI specs against the names Allocate hands out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from aiodp.config.model import Config
from aiodp.gpus import cdi
from tests.builders import gpu


def test_cdi_defined_names_from_json_and_yaml_specs(short_dir: Path) -> None:
    (short_dir / "a").mkdir()
    (short_dir / "a/nvidia.json").write_text(
        json.dumps({"cdiVersion": "0.6.0", "kind": "nvidia.com/gpu",
                    "devices": [{"name": "GPU-0"}, {"name": "0"}, {"name": "all"}]})
    )  # fmt: skip
    (short_dir / "a/imex.yaml").write_text(
        "cdiVersion: 0.6.0\nkind: nvidia.com/imex-channel\ndevices:\n  - name: '0'\n"
    )
    (short_dir / "a/broken.yaml").write_text("kind: [\n")
    (short_dir / "a/notes.txt").write_text("not a spec")
    names = cdi.defined_names([short_dir / "a", short_dir / "absent"], 1 << 20)
    assert names == {
        "nvidia.com/gpu=GPU-0", "nvidia.com/gpu=0", "nvidia.com/gpu=all",
        "nvidia.com/imex-channel=0",
    }  # fmt: skip


def test_cdi_expected_names_follow_the_id_strategy() -> None:
    devices = [gpu(0), gpu(1)]
    assert cdi.expected_names(devices, Config(), ()) == {
        "nvidia.com/gpu=GPU-0",
        "nvidia.com/gpu=GPU-1",
    }
    index = dataclasses.replace(Config(), device_id_strategy="index")
    assert cdi.expected_names(devices, index, (0,)) == {
        "nvidia.com/gpu=0", "nvidia.com/gpu=1", "nvidia.com/imex-channel=0",
    }  # fmt: skip
