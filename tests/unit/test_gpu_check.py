"""scripts/gpu_check.py's comparison of our GPU metrics with nvidia-smi's, on a recorded
nvidia-smi answer (the GPU machine runs it for real)."""

from __future__ import annotations

from aiodp.gpus.backend import GpuMetrics
from tests import scripts

gpu_check = scripts.load("gpu_check")
SMI = (
    "GPU-a, 37, 1024, 81559, 112.40, 41, 1980, 2619, 0, 0\n"
    "GPU-b, [N/A], 10, 81559, [Not Supported], 40, 1980, 2619, [N/A], [N/A]\n"
)


def test_gpu_check_pairs_agree_within_tolerance() -> None:
    ours = {
        "GPU-a": GpuMetrics(
            utilization_ratio=0.40, memory_used_bytes=1500 * 2**20,
            memory_total_bytes=81559 * 2**20, power_watts=110.0, temperature_celsius=42,
            sm_clock_hertz=1.98e9, memory_clock_hertz=2.619e9, ecc_corrected=0, ecc_uncorrected=0,
        ),
        "GPU-b": GpuMetrics(memory_used_bytes=10 * 2**20, memory_total_bytes=81559 * 2**20,
                            temperature_celsius=40, sm_clock_hertz=1.98e9,
                            memory_clock_hertz=2.619e9),
    }  # fmt: skip
    rows = gpu_check.compare(ours, SMI)
    assert all(ok for *_, ok in rows), rows
    assert len([r for r in rows if r[0] == "GPU-a"]) == 9
    assert {r[1] for r in rows if r[0] == "GPU-b"} == {  # N/A on its side: not compared
        "memory.used",
        "memory.total",
        "temperature.gpu",
        "clocks.sm",
        "clocks.mem",
    }


def test_gpu_check_flags_a_difference_and_a_missing_reading() -> None:
    ours = {"GPU-a": GpuMetrics(temperature_celsius=60.0, ecc_uncorrected=1.0)}
    rows = {r[1]: r for r in gpu_check.compare(ours, SMI) if r[0] == "GPU-a"}
    assert rows["temperature.gpu"][4] is False
    assert rows["ecc.errors.uncorrected.volatile.total"][4] is False
    assert rows["power.draw"][2:] == ("absent", "112.40", False)
