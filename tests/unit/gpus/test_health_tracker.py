"""HealthTracker under a fake clock: recovery periods, event kinds, fan-out."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiodp.config.model import Config, health_policy
from aiodp.gpus import sharing
from aiodp.gpus.backend import HealthEvent, Probe
from aiodp.gpus.devices import DeviceRegistry, Health
from aiodp.gpus.health import HealthTracker
from aiodp.gpus.simulated import SimulatedBackend
from aiodp.kit import metrics
from tests.builders import gpu, mig, replica

OK = Probe(Health.HEALTHY)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def node() -> DeviceRegistry:
    devs = [
        gpu(0, paths=()),
        mig("MIG-a", "GPU-1", "1:0"),
        mig("MIG-b", "GPU-1", "1:1"),
        replica(2, 0),
        replica(2, 1),
    ]
    return DeviceRegistry(devs)


def healthy(reg: DeviceRegistry) -> dict[str, bool]:
    return {d.id: d.health is Health.HEALTHY for d in reg.inventory().devices}


def all_ok() -> dict[str, Probe]:
    return {g: OK for g in ("GPU-0", "GPU-1", "GPU-2")}


def tracker(period: float) -> tuple[DeviceRegistry, HealthTracker, Clock]:
    reg, clock = node(), Clock()
    return reg, HealthTracker(reg, recovery_period=period, clock=clock), clock


def test_tracker_xid_recovers_after_the_period_of_passing_probes() -> None:
    reg, t, clock = tracker(300)
    t.on_probes(all_ok())
    t.on_event(HealthEvent("GPU-0", "XID 79", xid=79))
    assert reg.get("GPU-0").health is Health.UNHEALTHY  # type: ignore[union-attr]
    assert reg.get("GPU-0").reason == "XID 79"  # type: ignore[union-attr]
    for clock.now in (5, 100, 299):
        t.on_probes(all_ok())
        assert not healthy(reg)["GPU-0"]
    clock.now = 300
    changes = t.on_probes(all_ok())
    assert [(o.reason, n.health) for o, n in changes] == [("XID 79", Health.HEALTHY)]


def test_tracker_new_event_restarts_the_period() -> None:
    reg, t, clock = tracker(300)
    t.on_probes(all_ok())
    t.on_event(HealthEvent("GPU-0", "XID 79"))
    clock.now = 200
    t.on_event(HealthEvent("GPU-0", "XID 48"))
    clock.now = 400
    t.on_probes(all_ok())
    assert reg.get("GPU-0").reason == "XID 48"  # type: ignore[union-attr]
    clock.now = 500
    t.on_probes(all_ok())
    assert healthy(reg)["GPU-0"]


def test_tracker_failing_probe_restarts_the_period() -> None:
    reg, t, clock = tracker(60)
    t.on_probes({"GPU-0": Probe(Health.UNHEALTHY, "GPU is lost")})
    clock.now = 50
    t.on_probes(all_ok())
    clock.now = 70
    t.on_probes({"GPU-0": Probe(Health.UNHEALTHY, "GPU is lost")})
    clock.now = 100
    t.on_probes(all_ok())
    assert not healthy(reg)["GPU-0"]
    clock.now = 160
    t.on_probes(all_ok())
    assert healthy(reg)["GPU-0"]


def test_tracker_period_zero_never_recovers() -> None:
    reg, t, clock = tracker(0)
    t.on_probes(all_ok())
    t.on_event(HealthEvent("GPU-0", "XID 79"))
    clock.now = 1e9
    t.on_probes(all_ok())
    assert not healthy(reg)["GPU-0"]


def test_tracker_nvml_failure_clears_at_the_next_passing_probe() -> None:
    reg, t, _ = tracker(300)
    fail = Probe(Health.UNHEALTHY, "NVML failure: Driver Not Loaded", recovers_at_once=True)
    t.on_probes({g: fail for g in ("GPU-0", "GPU-1", "GPU-2")})
    assert not any(healthy(reg).values())
    t.on_probes(all_ok())
    assert all(healthy(reg).values())


def test_tracker_nvml_failure_does_not_hide_a_device_fault() -> None:
    reg, t, clock = tracker(300)
    t.on_event(HealthEvent("GPU-0", "XID 79"))
    fail = Probe(Health.UNHEALTHY, "NVML failure", recovers_at_once=True)
    t.on_probes({g: fail for g in ("GPU-0", "GPU-1", "GPU-2")})
    clock.now = 10
    t.on_probes(all_ok())
    assert healthy(reg) == {
        "GPU-0": False,
        "MIG-a": True,
        "MIG-b": True,
        "GPU-2::0": True,
        "GPU-2::1": True,
    }
    assert reg.get("GPU-0").reason == "XID 79"  # type: ignore[union-attr]


def test_tracker_fan_out() -> None:
    reg, t, _ = tracker(300)
    t.on_probes(all_ok())
    t.on_event(HealthEvent("MIG-a", "XID 94"))
    assert healthy(reg) == {
        "GPU-0": True,
        "MIG-a": False,
        "MIG-b": True,
        "GPU-2::0": True,
        "GPU-2::1": True,
    }
    t.on_event(HealthEvent("GPU-1", "XID 79"))
    t.on_event(HealthEvent("GPU-2", "XID 79"))
    assert healthy(reg) == {
        "GPU-0": True,
        "MIG-a": False,
        "MIG-b": False,
        "GPU-2::0": False,
        "GPU-2::1": False,
    }
    t.on_event(HealthEvent("", "NVML event wait failed", recovers_at_once=True))
    assert not any(healthy(reg).values())


def test_tracker_ignored_events_change_nothing(caplog: pytest.LogCaptureFixture) -> None:
    reg, t, _ = tracker(300)
    assert t.on_event(HealthEvent("GPU-0", "XID 13", xid=13)) == ()  # ignored by default
    assert all(healthy(reg).values())
    assert "ignoring XID 13 on GPU-0 (health policy)" in caplog.text


@pytest.mark.parametrize(
    ("disable", "enable", "xid", "critical"),
    [
        (None, None, 79, True),
        (None, None, 48, True),
        *[(None, None, x, False) for x in (13, 31, 43, 45, 68, 109)],
        ("xids", None, 79, False),
        ("all", None, 79, False),
        ("79, 94", None, 79, False),
        ("79,94", None, 48, True),
        (None, "13", 13, True),
        ("all", "79", 79, True),
        ("all", "79", 48, False),
        ("48", "48", 48, True),
    ],
)
def test_tracker_xid_policy_table(
    disable: str | None, enable: str | None, xid: int, critical: bool
) -> None:
    """NVIDIA's DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS, applied to raw events."""
    reg = node()
    t = HealthTracker(
        reg, recovery_period=300, policy=health_policy(disable, enable), clock=Clock()
    )
    t.on_event(HealthEvent("GPU-0", f"XID {xid}", xid=xid))
    assert healthy(reg)["GPU-0"] is not critical


def test_tracker_unknown_device_event_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    _reg, t, _ = tracker(300)
    assert t.on_event(HealthEvent("GPU-x", "XID 79", xid=79)) == ()
    assert "XID 79 on unknown device GPU-x" in caplog.text


def test_tracker_logs_replicas_of_a_gpu_as_one_line(caplog: pytest.LogCaptureFixture) -> None:
    _, t, _ = tracker(300)
    t.on_event(HealthEvent("GPU-2", "XID 79"))
    lines = [r.getMessage() for r in caplog.records if r.name == "aiodp.gpus.health"]
    assert lines == ["device GPU-2 (2 replicas) health Healthy -> Unhealthy (XID 79)"]


README_GPU = """\
gpus:
  - uuid: GPU-8f2c
    name: NVIDIA H100 80GB HBM3
    health: Healthy              # Healthy | Unhealthy
    reason: "XID 79"             # optional; shown while Unhealthy
"""


async def test_tracker_a_healthy_gpus_reason_is_no_transition(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's simulated example (Healthy, with a reason for when it is not): no
    'Healthy -> Healthy' line and no to_healthy count for a transition that never was."""
    path = short_dir / "d.yaml"
    path.write_text(README_GPU)
    before = metrics.samples(metrics.render()[0].decode())
    async with SimulatedBackend(path) as backend:
        infos = await backend.discover()
        reg = DeviceRegistry(sharing.plan(infos, Config()).devices)
        assert reg.get("GPU-8f2c").reason == ""  # type: ignore[union-attr]
        t = HealthTracker(reg, recovery_period=0, clock=Clock())
        assert t.on_probes(await backend.probe_health(["GPU-8f2c"])) == ()
    after = metrics.samples(metrics.render()[0].decode())
    key = (
        'aiodp_health_transitions_total{direction="to_healthy",reason="XID 79",'
        'resource="nvidia.com/gpu"}'
    )
    assert after.get(key, 0) == before.get(key, 0)
    assert "Healthy -> Healthy" not in caplog.text


def test_tracker_a_new_reason_while_unhealthy_is_no_second_transition(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg, t, _ = tracker(300)
    t.on_probes(all_ok())
    t.on_event(HealthEvent("GPU-0", "XID 79", xid=79))
    assert reg.get("GPU-0").reason == "XID 79"  # type: ignore[union-attr]
    before = metrics.samples(metrics.render()[0].decode())
    t.on_event(HealthEvent("GPU-0", "XID 48", xid=48))
    after = metrics.samples(metrics.render()[0].decode())
    total = (
        'aiodp_health_transitions_total{direction="to_unhealthy",reason="XID 48",'
        'resource="nvidia.com/gpu"}'
    )
    assert after.get(total, 0) == before.get(total, 0)
    assert "Unhealthy -> Unhealthy" not in caplog.text


def test_tracker_a_hold_keeps_a_gpu_unhealthy_whatever_the_probes_say() -> None:
    reg, t, clock = tracker(300)
    t.on_probes(all_ok())
    t.hold(["GPU-1"], "MPS control daemon for nvidia.com/gpu is down")
    assert not healthy(reg)["MIG-a"]  # everything on the GPU
    assert reg.get("MIG-b").reason == "MPS control daemon for nvidia.com/gpu is down"  # type: ignore[union-attr]
    clock.now = 1000
    t.on_probes(all_ok())
    assert not healthy(reg)["MIG-a"]
    assert healthy(reg)["GPU-0"]
    t.hold(["GPU-1"], None)
    assert healthy(reg)["MIG-a"]
    assert healthy(reg)["MIG-b"]


def test_tracker_a_released_hold_leaves_the_gpus_own_fault() -> None:
    reg, t, _ = tracker(300)
    t.on_probes(all_ok())
    t.on_event(HealthEvent("GPU-0", "XID 79", xid=79))
    t.hold(["GPU-0"], "MPS down")
    t.hold(["GPU-0"], None)
    assert reg.get("GPU-0").reason == "XID 79"  # type: ignore[union-attr]
