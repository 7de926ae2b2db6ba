"""The demo in-process: the story it prints, and that it ends cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiodp.config import resolve
from aiodp.config.model import Config
from aiodp.standins import demo

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


async def test_demo_tells_the_whole_story(capsys: pytest.CaptureFixture[str]) -> None:
    assert await demo.run(Config()) == 0
    out = capsys.readouterr().out
    assert "1. registered nvidia.com/gpu on endpoint aiodp-nvidia-gpu.sock" in out
    assert "GPU-00000000-aiod-4d3e-8f00-00005eed0000     Healthy    0" in out
    assert (
        "3. GetPreferredAllocation(4 of 8 nvidia.com/gpu, must include GPU 5) -> GPUs [4, 5, 6, 7]"
        in out
    )
    assert "Allocate(unknown id) -> INVALID_ARGUMENT" in out
    assert "(readyz: ok)" in out
    assert "5. kubelet restart: re-registered after" in out
    assert "6. stopped with exit code 0; sockets left: ['kubelet.sock']" in out


async def test_demo_without_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    assert await demo.run(Config(metrics_address="")) == 0
    assert "metrics and probes" not in capsys.readouterr().out


async def test_demo_runs_the_readmes_time_slicing_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's time-slicing file renames the resource: the demo follows what registered
    (it asked for nvidia.com/gpu by name and died with a KeyError)."""
    text = README.read_text()
    start = text.index("**Time-slicing**")
    block = text[
        text.index("```yaml\n", start) + 8 : text.index("```", text.index("```yaml\n", start) + 8)
    ]
    assert "renameByDefault: true" in block
    path = tmp_path / "time-slicing.yaml"
    path.write_text(block)
    config = resolve.resolve(["demo", "--config-file", str(path)], {})
    assert await demo.run(config) == 0
    out = capsys.readouterr().out
    assert "1. registered nvidia.com/gpu.shared" in out
    assert "(4 of 32 nvidia.com/gpu.shared, must include GPU 5)" in out
    assert "GPU 3 Unhealthy seen by the kubelet" in out
    assert "6. stopped with exit code 0" in out
