"""The DRA preparer's files: the checkpoint that is missing, corrupt or huge, and CDI or
checkpoint writes that fail (each is that claim's error; nothing is half-recorded)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aiodp.config import resolve as cfg
from aiodp.dra import prepared as draclaims
from aiodp.dra.claims import ClaimRef
from aiodp.gpus import sharing, simulated
from aiodp.gpus.devices import DeviceRegistry
from aiodp.standins.testbed import h100_node

NODE = "node-1"
DRIVER = "gpu.aiodp.io"


def preparer(directory: Path) -> draclaims.ClaimPreparer:
    config = cfg.build(
        {"dra": True, "dra_devices": "all", "dra_plugins_dir": directory / "plugins",
         "dra_cdi_dir": directory / "cdi"}, None,
    )  # fmt: skip
    plan = sharing.plan(simulated.parse(h100_node()).gpus, config)
    live = SimpleNamespace(config=config, control_paths=(), imex_channels=())

    async def read(ref: ClaimRef) -> dict[str, Any]:
        return {
            "metadata": {"uid": ref.uid},
            "status": {"allocation": {"devices": {"results": [
                {"request": "r", "driver": DRIVER, "pool": NODE, "device": "gpu-1"}
            ]}}},
        }  # fmt: skip

    return draclaims.ClaimPreparer(
        lambda: live, DeviceRegistry(plan.devices), sharing.dra_resource(DRIVER), NODE, read
    )


REF = ClaimRef("ns", "c", "uid-1")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "unreadable"),
        (json.dumps({"version": 9, "claims": {}}).encode(), "not an aiodp claim checkpoint"),
        (b" " * (draclaims.MAX_CHECKPOINT_BYTES + 1), "larger than"),
    ],
)
async def test_a_bad_checkpoint_is_one_line_and_no_claims(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, why: str
) -> None:
    p = preparer(tmp_path)
    p.config.dra_checkpoint.parent.mkdir(parents=True)
    p.config.dra_checkpoint.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        await p.load()
    assert p.prepared == {}
    assert why in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_missing_checkpoint_is_no_claims(tmp_path: Path) -> None:
    p = preparer(tmp_path)
    await p.load()
    assert p.prepared == {}


async def test_a_failed_write_records_nothing(tmp_path: Path) -> None:
    """The CDI directory is a file: the spec cannot be written; the claim is not recorded,
    and a later unprepare of it succeeds (it was never prepared)."""
    p = preparer(tmp_path)
    (tmp_path / "cdi").write_text("a file, not a directory")
    out = await p.prepare([REF])
    assert "cannot write the claim's CDI spec or checkpoint" in str(out["uid-1"])
    assert p.prepared == {}
    assert not p.config.dra_checkpoint.exists()
    assert await p.unprepare([REF]) == {"uid-1": ""}


async def test_a_failed_unprepare_keeps_the_claim(tmp_path: Path) -> None:
    p = preparer(tmp_path)
    assert not isinstance((await p.prepare([REF]))["uid-1"], str)
    spec = Path(p.prepared["uid-1"]["spec"])
    _swap(spec, to_dir=True)  # a directory where the spec was: it cannot be removed as a file
    out = await p.unprepare([REF])
    assert "cannot remove the claim's CDI spec" in out["uid-1"]
    assert "uid-1" in p.prepared  # still recorded: the kubelet will ask again
    _swap(spec, to_dir=False)
    assert await p.unprepare([REF]) == {"uid-1": ""}
    assert json.loads(p.config.dra_checkpoint.read_text())["claims"] == {}


def _swap(path: Path, *, to_dir: bool) -> None:
    """Put a directory where the file `path` is, or remove that directory again."""
    if to_dir:
        path.unlink()
        path.mkdir()
    else:
        path.rmdir()
