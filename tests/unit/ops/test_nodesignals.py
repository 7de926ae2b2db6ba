from __future__ import annotations

import dataclasses
from pathlib import Path

from aiodp.gpus.devices import Health, Inventory
from aiodp.ops import nodesignals
from aiodp.ops.nodesignals import Fault
from tests.builders import gpu, mig, replica


def test_critical_faults_are_xids_and_lost_gpus_once_per_gpu() -> None:
    sick = Health.UNHEALTHY
    inventory = Inventory.of(
        [
            gpu(0, health=sick, reason="XID 79 (fell off the bus)"),
            dataclasses.replace(replica(0, 1), health=sick, reason="XID 79 (fell off the bus)"),
            gpu(1, health=sick, reason="GPU is lost"),
            gpu(2, health=sick, reason="NVML failure: Driver Not Loaded"),  # the node, not a GPU
            gpu(3),
            mig("MIG-a", "GPU-4", "4:0"),
        ],
        1,
    )  # fmt: skip
    faults = nodesignals.critical(inventory)
    assert faults == (
        Fault("GPU-0", "0", "XID 79 (fell off the bus)"),
        Fault("GPU-1", "1", "GPU is lost"),
    )
    assert [f.kind for f in faults] == ["XidCriticalError", "GPULost"]


def test_condition_bounds_its_message() -> None:
    faults = [Fault(f"GPU-{i}", str(i), "XID 48") for i in range(20)]
    cond = nodesignals.condition(faults, "boot-1")
    assert (cond["status"], cond["reason"]) == ("False", "XidCriticalError")
    assert "and 12 more; boot boot-1" in cond["message"]
    assert len(cond["message"]) < 600
    lost = nodesignals.condition([Fault("GPU-0", "0", "GPU is lost")], "b")
    assert lost["reason"] == "GPULost"
    assert nodesignals.condition([], "b")["status"] == "True"


def test_boot_id(short_dir: Path) -> None:
    assert nodesignals.boot_id(short_dir) == "unknown"
    (short_dir / "sys/kernel/random").mkdir(parents=True)
    (short_dir / "sys/kernel/random/boot_id").write_text("abc\n")
    assert nodesignals.boot_id(short_dir) == "abc"
