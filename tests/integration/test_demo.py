"""The demo in-process: the story it prints, and that it ends cleanly."""

from __future__ import annotations

import pytest

from aiodp.config.model import Config
from aiodp.standins import demo

pytestmark = pytest.mark.integration


async def test_demo_tells_the_whole_story(capsys: pytest.CaptureFixture[str]) -> None:
    assert await demo.run(Config()) == 0
    out = capsys.readouterr().out
    assert "1. registered nvidia.com/gpu on endpoint aiodp-nvidia-gpu.sock" in out
    assert "GPU-00000000-aiod-4d3e-8f00-00005eed0000     Healthy    0" in out
    assert "3. GetPreferredAllocation(4 of 8, must include GPU 5) -> GPUs [4, 5, 6, 7]" in out
    assert "Allocate(unknown id) -> INVALID_ARGUMENT" in out
    assert "(readyz: ok)" in out
    assert "5. kubelet restart: re-registered after" in out
    assert "6. stopped with exit code 0; sockets left: ['kubelet.sock']" in out


async def test_demo_without_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    assert await demo.run(Config(metrics_address="")) == 0
    assert "metrics and probes" not in capsys.readouterr().out
