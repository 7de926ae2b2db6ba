"""NvmlBackend driven through the fake NVML: discovery, topology, probes, XID events."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiodp.config.model import Config
from aiodp.gpus.backend import HealthEvent, control_paths, sysfs_bdf
from aiodp.gpus.devices import Health
from aiodp.gpus.nvml import NvmlBackend, mig_profile
from aiodp.kit import metrics
from aiodp.kit.errors import BackendUnavailable
from tests import fakenvml
from tests.fakenvml import FakeMachine, dgx, with_mig


def roots(base: Path, machine: FakeMachine) -> Config:
    """Fake /sys, /proc and /dev trees for the machine."""
    for i, gpu in enumerate(machine.gpus):
        d = base / "sys/bus/pci/devices" / sysfs_bdf(gpu.bus_id)
        d.mkdir(parents=True)
        if i != 7:  # GPU 7: no numa_node file
            (d / "numa_node").write_text("-1\n" if i == 6 else f"{gpu.numa}\n")
    for p in ("dev/nvidiactl", "dev/nvidia-uvm"):
        (base / p).parent.mkdir(parents=True, exist_ok=True)
        (base / p).write_text("")
    caps = base / "proc/driver/nvidia/capabilities/gpu3/mig"
    for gi, minor in ((7, 66), (8, 75), (3, 30)):
        (caps / f"gi{gi}/ci0").mkdir(parents=True)
        (caps / f"gi{gi}/access").write_text(f"DeviceFileMinor: {minor}\nDeviceFileMode: 292\n")
        (caps / f"gi{gi}/ci0/access").write_text(f"DeviceFileMinor: {minor + 1}\n")
    return dataclasses.replace(
        Config(),
        nvidia_driver_root=base,
        sys_root=base / "sys",
        proc_root=base / "proc",
    )


def on(config: Config, machine: FakeMachine) -> NvmlBackend:
    """An NvmlBackend over the fake machine, reading sysfs and procfs under the config's roots."""
    return NvmlBackend(sys_root=config.sys_root, proc_root=config.proc_root, nvml=machine.module())


@pytest.fixture
def machine() -> FakeMachine:
    return with_mig(dgx(8), 3)


@pytest.fixture
async def backend(short_dir: Path, machine: FakeMachine) -> AsyncIterator[NvmlBackend]:
    async with on(roots(short_dir, machine), machine) as b:
        yield b


def test_nvml_helpers() -> None:
    assert sysfs_bdf("00000000:1A:00.0") == "0000:1a:00.0"
    assert mig_profile(1, 1, 9856) == "1g.10gb"
    assert mig_profile(2, 1, 19968) == "1c.2g.20gb"
    assert mig_profile(7, 7, 80000) == "7g.79gb"


async def test_nvml_discovery_table(backend: NvmlBackend, short_dir: Path) -> None:
    infos = await backend.discover()
    assert [g.index for g in infos] == list(range(8))
    g0 = infos[0]
    assert (g0.uuid, g0.minor, g0.name, g0.memory_mib) == (
        "GPU-fake-0000",
        0,
        "NVIDIA H100 80GB HBM3",
        81559,
    )
    assert g0.pci_bus_id == "00000000:18:00.0"
    assert g0.paths == ("/dev/nvidia0",)
    assert [g.numa_node for g in infos] == [0, 0, 0, 0, 1, 1, None, None]
    assert not g0.mig_enabled
    mig = infos[3]
    assert mig.mig_enabled
    assert [(m.uuid, m.profile, m.gi, m.ci, m.index) for m in mig.mig_devices] == [
        ("MIG-fake-3-a", "1g.10gb", 7, 0, 0),
        ("MIG-fake-3-b", "1g.10gb", 8, 0, 1),
        ("MIG-fake-3-c", "2g.20gb", 3, 0, 2),
    ]
    assert mig.mig_devices[0].paths == (
        "/dev/nvidia-caps/nvidia-cap66",
        "/dev/nvidia-caps/nvidia-cap67",
    )
    assert control_paths(short_dir) == ("/dev/nvidiactl", "/dev/nvidia-uvm")  # the dev root


async def test_nvml_topology_cached_at_discovery(
    backend: NvmlBackend, machine: FakeMachine
) -> None:
    await backend.discover()
    machine.calls.clear()
    topo = await backend.topology()
    assert machine.calls == []  # no NVML on the request path
    uuid = [g.uuid for g in machine.gpus]
    assert topo.score(uuid[0], uuid[1]) == 4 * 100 + 50  # 4 NVLinks + single switch
    assert topo.score(uuid[0], uuid[2]) == 2 * 100 + 30  # 2 NVLinks + host bridge
    assert topo.score(uuid[0], uuid[4]) == 10  # across NUMA nodes, no NVLink


async def test_nvml_probe_reports_each_fault(backend: NvmlBackend, machine: FakeMachine) -> None:
    infos = await backend.discover()
    ids = [g.uuid for g in infos]
    machine.gpus[1].lost = True
    machine.gpus[2].retired_pending = True
    machine.gpus[5].remap_failure = True
    probes = await backend.probe_health(ids)
    assert probes[ids[0]].health is Health.HEALTHY
    assert (probes[ids[1]].health, probes[ids[1]].reason) == (Health.UNHEALTHY, "GPU is lost")
    assert probes[ids[2]].reason == "retired pages pending (reset required)"
    assert probes[ids[5]].reason == "row remapping failed"
    assert not probes[ids[1]].recovers_at_once


async def test_nvml_probe_fail_safe_when_nvml_fails_and_recovers(
    backend: NvmlBackend, machine: FakeMachine
) -> None:
    ids = [g.uuid for g in await backend.discover()]
    machine.broken = fakenvml.NVML_ERROR_DRIVER_NOT_LOADED
    probes = await backend.probe_health(ids)
    assert {p.health for p in probes.values()} == {Health.UNHEALTHY}
    assert all(p.reason == "NVML failure: Driver Not Loaded" for p in probes.values())
    assert all(p.recovers_at_once for p in probes.values())
    again = await backend.probe_health(ids)  # still broken: re-init fails too
    assert {p.health for p in again.values()} == {Health.UNHEALTHY}
    machine.broken = None
    healed = await backend.probe_health(ids)
    assert {p.health for p in healed.values()} == {Health.HEALTHY}
    assert machine.calls.count("nvmlInit") == 3  # start, failed retry, successful retry


@pytest.mark.parametrize("code", [fakenvml.NVML_ERROR_LIBRARY_NOT_FOUND, 9])
async def test_nvml_init_failure_is_backend_unavailable(short_dir: Path, code: int) -> None:
    machine = dgx(2)
    machine.init_error = code
    with pytest.raises(BackendUnavailable, match="NVML initialisation failed"):
        async with on(Config(), machine):
            pass


async def next_event(events: AsyncIterator[HealthEvent]) -> HealthEvent:
    async with asyncio.timeout(5):
        return await anext(events)


@pytest.mark.parametrize("xid", [79, 48, 13, 31, 43, 45, 68, 109, 94])
async def test_nvml_reports_every_xid_raw(short_dir: Path, machine: FakeMachine, xid: int) -> None:
    """The backend reports every XID as it is; which ones act is health.py's policy."""
    async with on(roots(short_dir, machine), machine) as backend:
        await backend.discover()
        events = backend.health_events()
        try:
            machine.inject_xid(2, xid)
            event = await next_event(events)
        finally:
            await events.aclose()
    assert event == HealthEvent(machine.gpus[2].uuid, f"XID {xid}", xid=xid)


async def test_nvml_xid_on_a_mig_instance_names_the_mig_device(
    backend: NvmlBackend, machine: FakeMachine
) -> None:
    await backend.discover()
    events = backend.health_events()
    try:
        machine.inject_xid(3, 94, gi=8, ci=0)
        assert (await next_event(events)).uuid == "MIG-fake-3-b"
        machine.inject_xid(3, 79)
        assert (await next_event(events)).uuid == machine.gpus[3].uuid
    finally:
        await events.aclose()


async def test_nvml_event_wait_failure_reports_all_devices(
    backend: NvmlBackend, machine: FakeMachine
) -> None:
    await backend.discover()
    events = backend.health_events()
    try:
        machine.wait_error = fakenvml.NVML_ERROR_GPU_IS_LOST
        event = await next_event(events)
    finally:
        await events.aclose()
    assert event.uuid == ""
    assert event.reason == "NVML event wait failed: GPU is lost"
    assert event.recovers_at_once


async def test_nvml_gpu_without_event_support_stays_healthy(
    backend: NvmlBackend, machine: FakeMachine, caplog: pytest.LogCaptureFixture
) -> None:
    machine.gpus[0].events_supported = False
    await backend.discover()
    events = backend.health_events()
    try:
        machine.inject_xid(1, 79)
        assert (await next_event(events)).uuid == machine.gpus[1].uuid
    finally:
        await events.aclose()
    assert "cannot report XID events" in caplog.text


async def test_nvml_metrics_in_prometheus_units(backend: NvmlBackend, machine: FakeMachine) -> None:
    gpu = machine.gpus[1]
    gpu.utilization, gpu.memory_used, gpu.power_mw, gpu.energy_mj = (87, 40), 2**30, 412_500, 9000
    gpu.clock_events = 0x4 | 0x40  # SW power cap, HW thermal slowdown
    gpu.ecc, gpu.retired, gpu.remapped, gpu.pcie_replays = (5, 1), (2, 1), (3, 0), 7
    gpu.nvlink_errors = {2: 1}  # one CRC flit error on each active link
    assert await backend.read_metrics() == {}  # nothing to read before discovery
    await backend.discover()
    machine.gpus[3].migs[0].memory_used = 2**29  # type: ignore[index]
    reading = await backend.read_metrics()
    migs = {m.uuid for m in machine.gpus[3].migs or []}
    assert set(reading) == {g.uuid for g in machine.gpus} | migs
    # a MIG device: its own memory, nothing NVML reads only per GPU
    a = reading["MIG-fake-3-a"]
    assert (a.memory_used_bytes, a.memory_total_bytes) == (2**29, 9856 * 2**20)
    assert a.power_watts is None
    assert a.utilization_ratio is None
    m = reading[gpu.uuid]
    assert (m.utilization_ratio, m.memory_utilization_ratio) == (0.87, 0.40)
    assert (m.memory_used_bytes, m.memory_total_bytes) == (2**30, gpu.memory)
    assert (m.power_watts, m.energy_joules, m.temperature_celsius) == (412.5, 9, 35)
    assert (m.sm_clock_hertz, m.memory_clock_hertz) == (1980e6, 2619e6)
    assert m.clock_events == frozenset({"sw_power_cap", "hw_thermal_slowdown"})
    assert (m.ecc_corrected, m.ecc_uncorrected, m.retired_pages) == (5, 1, 3)
    assert (m.remapped_rows_corrected, m.remapped_rows_uncorrected, m.pcie_replays) == (3, 0, 7)
    links = sum(gpu.nvlinks.values())
    assert m.nvlink_errors == {"replay": 0, "recovery": 0, "crc_flit": links, "crc_data": 0}


async def test_nvml_metrics_unsupported_left_out_failed_counted(
    backend: NvmlBackend, machine: FakeMachine, caplog: pytest.LogCaptureFixture
) -> None:
    # without the batched read (an older driver), each reading is a call of its own
    machine.unsupported = {
        "nvmlDeviceGetFieldValues",
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetNvLinkState",
    }
    machine.failing = {"nvmlDeviceGetPowerUsage"}
    before = _errors("nvmlDeviceGetPowerUsage")
    await backend.discover()
    first = await backend.read_metrics()
    second = await backend.read_metrics()
    for reading in (first, second):
        for u, m in reading.items():
            if u.startswith("MIG-"):
                continue
            assert m.energy_joules is None
            assert m.power_watts is None
            assert m.nvlink_errors is None
            assert m.temperature_celsius == 35  # the rest still comes
    assert _errors("nvmlDeviceGetPowerUsage") == before + 2 * len(machine.gpus)
    said = [r.getMessage() for r in caplog.records if "does not support energy" in r.getMessage()]
    assert len(said) == len(machine.gpus)  # once per GPU, not once per reading
    # a failed reading is never a health verdict
    assert all(p.health == Health.HEALTHY for p in (await backend.probe_health([])).values())


async def test_nvml_metrics_bindings_without_a_function(short_dir: Path) -> None:
    machine = dgx(2)
    module = machine.module()
    del module.nvmlDeviceGetCurrentClocksEventReasons  # older nvidia-ml-py
    async with NvmlBackend(sys_root=short_dir, proc_root=short_dir, nvml=module) as b:
        await b.discover()
        reading = await b.read_metrics()
    assert [m.clock_events for m in reading.values()] == [None, None]
    assert [m.sm_clock_hertz for m in reading.values()] == [1980e6, 1980e6]


def _errors(function: str) -> float:
    return metrics.samples(metrics.render()[0].decode()).get(
        f'aiodp_nvml_errors_total{{function="{function}"}}', 0.0
    )


async def test_nvml_metrics_batch_the_counters(
    backend: NvmlBackend, machine: FakeMachine, caplog: pytest.LogCaptureFixture
) -> None:
    """ECC, energy, PCIe replays and the NVLink totals come from one nvmlDeviceGetFieldValues
    per GPU, not a call each (and one per link for NVLink); a field the GPU lacks is absent."""
    gpu = machine.gpus[0]
    gpu.ecc, gpu.energy_mj, gpu.pcie_replays, gpu.nvlink_errors = (2, 1), 5000, 3, {0: 2}
    machine.unsupported_fields = {94}  # no PCIe replay counter on this one
    await backend.discover()
    del machine.calls[:]
    first = await backend.read_metrics()
    await backend.read_metrics()
    m = first[gpu.uuid]
    assert (m.ecc_corrected, m.ecc_uncorrected, m.energy_joules) == (2, 1, 5)
    assert m.pcie_replays is None
    links = sum(gpu.nvlinks.values())
    assert m.nvlink_errors == {"replay": 2 * links, "recovery": 0, "crc_flit": 0, "crc_data": 0}
    assert machine.calls.count("nvmlDeviceGetFieldValues") == 2 * len(machine.gpus)
    for one_by_one in (
        "nvmlDeviceGetNvLinkErrorCounter",
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetPcieReplayCounter",
        "nvmlDeviceGetTotalEnergyConsumption",
    ):
        assert one_by_one not in machine.calls
    said = [r for r in caplog.records if "does not support pcie_replays" in r.getMessage()]
    assert len(said) == len(machine.gpus)  # once per GPU


async def test_nvml_pcie_root_class_fabric_and_mig_capability(short_dir: Path) -> None:
    """What GFD's labels and DRA's standard attributes need, read from sysfs and NVML."""
    machine = dgx(2)
    machine.gpus[1].mig_capable = False
    machine.gpus[0].fabric = (bytes(range(16)), 7)
    sysfs = short_dir / "sys"
    bdf = sysfs_bdf(machine.gpus[0].bus_id)
    real = sysfs / "devices/pci0000:17/0000:17:00.0" / bdf
    real.mkdir(parents=True)
    (real / "class").write_text("0x030200\n")
    (sysfs / "bus/pci/devices").mkdir(parents=True)
    (sysfs / "bus/pci/devices" / bdf).symlink_to(real)
    config = dataclasses.replace(Config(), sys_root=sysfs, proc_root=short_dir / "proc")
    async with on(config, machine) as b:
        first, second = await b.discover()
    assert (first.pcie_root, first.pci_class) == ("pci0000:17", 0x030200)
    assert (second.pcie_root, second.pci_class) == ("", None)  # no sysfs entry: unknown
    assert first.fabric == "00010203-0405-0607-0809-0a0b0c0d0e0f.7"
    assert second.fabric == ""
    assert (first.mig_capable, second.mig_capable) == (True, False)


async def test_nvml_mig_attributes_and_placement(short_dir: Path) -> None:
    machine = with_mig(dgx(4), 3)
    machine.gpus[3].migs[2].placement = (4, 2)  # type: ignore[index]
    async with on(roots(short_dir, machine), machine) as b:
        infos = await b.discover()
    a, _, c = infos[3].mig_devices
    assert (a.placement, c.placement) == ((0, 1), (4, 2))
    assert (c.memory_mb, c.multiprocessors, c.gi_slices, c.engines) == (
        19968,
        16,
        2,
        (1, 1, 0, 0, 0),
    )
