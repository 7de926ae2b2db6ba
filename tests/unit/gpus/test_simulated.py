from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aiodp.gpus import simulated
from aiodp.gpus.backend import HealthEvent, control_paths
from aiodp.gpus.devices import Health
from aiodp.gpus.simulated import SimulatedBackend, SimulatedFileError
from aiodp.standins.testbed import gpu_uuid
from tests.harness import h100_node


def test_simulated_parse_defaults() -> None:
    node = simulated.parse("gpus:\n  - uuid: GPU-a\n  - uuid: GPU-b\n    minor: 7\n")
    a, b = node.gpus
    assert (a.uuid, a.index, a.minor, a.paths, a.health) == (
        "GPU-a",
        0,
        0,
        ("/dev/nvidia0",),
        Health.HEALTHY,
    )
    assert (b.index, b.minor, b.paths) == (1, 7, ("/dev/nvidia7",))
    assert a.numa_node is None


def test_simulated_demo_node_topology() -> None:
    node = simulated.parse(h100_node({2: "XID 79"}))
    assert len(node.gpus) == 8
    assert node.gpus[2].health is Health.UNHEALTHY
    assert node.gpus[2].reason == "XID 79"
    topo = node.topology()
    assert topo.score(node.gpus[0].uuid, node.gpus[1].uuid) == 420
    assert topo.score(node.gpus[0].uuid, node.gpus[4].uuid) == 210
    assert topo.score(node.gpus[0].uuid, node.gpus[5].uuid) == 10


def test_simulated_metrics_block() -> None:
    node = simulated.parse(
        "gpus:\n  - uuid: GPU-a\n    metrics: {power_watts: 300, clock_events: [gpu_idle],"
        " nvlink_errors: {replay: 2}}\n  - uuid: GPU-b\n"
    )
    assert set(node.metrics) == {"GPU-a"}  # a GPU without the block has no readings
    m = node.metrics["GPU-a"]
    assert (m.power_watts, m.clock_events, m.nvlink_errors) == (
        300,
        frozenset({"gpu_idle"}),
        {"replay": 2},
    )
    assert m.temperature_celsius is None


def test_simulated_mig_devices() -> None:
    node = simulated.parse(
        "gpus:\n  - uuid: GPU-a\n    mig_devices:\n"
        "      - {uuid: MIG-1, profile: 1g.10gb, gi: 7, ci: 0}\n"
    )
    (mig,) = node.gpus[0].mig_devices
    assert (mig.uuid, mig.profile, mig.gi, mig.ci) == ("MIG-1", "1g.10gb", 7, 0)
    assert node.gpus[0].mig_enabled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpus: [: x", "invalid YAML"),
        ("- a\n", "must be a mapping with a 'gpus' list"),
        ("gpus: []\nextra: 1\n", "unknown key(s) extra"),
        ("gpus: 3\n", "gpus: must be a list"),
        ("gpus: [3]\n", "gpus[0]: must be a mapping"),
        ("gpus: [{name: x}]\n", "gpus[0].uuid: is required"),
        ("gpus: [{uuid: ''}]\n", "gpus[0].uuid: must be a non-empty string"),
        ("gpus: [{uuid: a}, {uuid: a}]\n", "gpus[1].uuid: duplicate uuid 'a'"),
        ("gpus: [{uuid: a, index: 1}, {uuid: b, index: 1}]\n", "gpus[1].index: duplicate index 1"),
        ("gpus: [{uuid: a, colour: red}]\n", "gpus[0]: unknown key(s) colour"),
        ("gpus: [{uuid: a, health: sick}]\n", "gpus[0].health: must be Healthy or Unhealthy"),
        ("gpus: [{uuid: a, index: -1}]\n", "gpus[0].index: must be an integer >= 0, got -1"),
        ("gpus: [{uuid: a, numa_node: x}]\n", "gpus[0].numa_node: must be an integer"),
        ("gpus: [{uuid: a}]\nnvlinks: [[0, 0, 1]]\n", "nvlinks[0]: must join two different"),
        ("gpus: [{uuid: a}, {uuid: b}]\nnvlinks: [[0, 1, 0]]\n", "must be an integer >= 1"),
        ("gpus: [{uuid: a}]\nnvlinks: [[0, 1]]\n", "nvlinks[0]: must be [gpu index"),
        (
            "gpus: [{uuid: a, mig_devices: [{uuid: a, profile: p, gi: 1, ci: 0}]}]\n",
            "mig_devices[0].uuid: duplicate uuid 'a'",
        ),
        ("gpus: [{uuid: a, metrics: 3}]\n", "gpus[0].metrics: must be a mapping"),
        ("gpus: [{uuid: a, metrics: {fan: 1}}]\n", "gpus[0].metrics.fan: unknown metric"),
        (
            "gpus: [{uuid: a, mig_devices: [{uuid: m, profile: p, gi: 1, ci: 0, "
            "metrics: {fan: 1}}]}]\n",
            "gpus[0].mig_devices[0].metrics.fan: unknown metric",
        ),
        ("gpus: [{uuid: a, metrics: {power_watts: -1}}]\n", "power_watts: must be a number >= 0"),
        ("gpus: [{uuid: a, metrics: {power_watts: yes}}]\n", "must be a number >= 0, got True"),
        ("gpus: [{uuid: a, metrics: {clock_events: [hot]}}]\n", "clock_events: must list some"),
        ("gpus: [{uuid: a, metrics: {nvlink_errors: {x: 1}}}]\n", "must map some of replay"),
        ("gpus: [{uuid: a, metrics: {nvlink_errors: {replay: z}}}]\n", "must map some of"),
    ],
)
def test_simulated_parse_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(SimulatedFileError) as err:
        simulated.parse(text, "f.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("f.yaml")


async def test_simulated_reload_keeps_last_good(short_dir: Path) -> None:
    path = short_dir / "d.yaml"
    path.write_text(h100_node())
    async with SimulatedBackend(path) as backend:
        assert len(await backend.discover()) == 8
        assert await backend.reload() is False  # unchanged
        path.write_text("gpus: [{uuid: a}, {uuid: a}]\n")
        assert await backend.reload() is False
        assert len(await backend.discover()) == 8
        path.write_text(h100_node({0: "x"}))
        assert await backend.reload() is True
        probes = await backend.probe_health([])
        assert [p.health for p in probes.values()].count(Health.UNHEALTHY) == 1
        path.unlink()
        assert await backend.reload() is False


def test_control_paths_only_those_that_exist(short_dir: Path) -> None:
    """Simulated or not, only control nodes present under the dev root are handed out."""
    assert control_paths(short_dir) == ()
    (short_dir / "dev").mkdir()
    (short_dir / "dev/nvidia-uvm").write_text("")
    (short_dir / "dev/nvidiactl").write_text("")
    assert control_paths(short_dir) == ("/dev/nvidiactl", "/dev/nvidia-uvm")


async def test_simulated_missing_file_at_start(short_dir: Path) -> None:
    with pytest.raises(SimulatedFileError, match="cannot read"):
        async with SimulatedBackend(short_dir / "missing.yaml"):
            pass


async def test_simulated_xids_an_edit_adds_are_events_once(short_dir: Path) -> None:
    """`xids:` listed at start are history, not events; each XID an edit adds is one event
    (a device fault: the recovery period applies), an unchanged list reports nothing. Each
    edit's events are read up to a marker XID, so an extra event would show in order."""
    path = short_dir / "d.yaml"

    def with_xids(xids: str) -> str:
        return h100_node().replace("    index: 0\n", f"    index: 0\n    xids: [{xids}]\n", 1)

    path.write_text(with_xids("48"))
    async with SimulatedBackend(path) as backend:
        events = backend.health_events()
        seen: list[HealthEvent] = []
        for xids in ("48, 79, 94", "79, 94", "79, 94, 31"):
            path.write_text(with_xids(xids))
            assert await backend.reload() is True
        async with asyncio.timeout(5):
            while not seen or seen[-1].xid != 31:
                seen.append(await anext(events))
        assert [(e.uuid, e.xid, e.reason) for e in seen] == [
            (gpu_uuid(0), 79, "XID 79"), (gpu_uuid(0), 94, "XID 94"), (gpu_uuid(0), 31, "XID 31"),
        ]  # fmt: skip
        await events.aclose()


def test_simulated_xids_are_bounded_numbers() -> None:
    with pytest.raises(SimulatedFileError, match=r"gpus\[0\]\.xids: must be a list"):
        simulated.parse("gpus: [{uuid: GPU-a, xids: 79}]\n")
    with pytest.raises(SimulatedFileError, match=r"gpus\[0\]\.xids\[1\]: must be an integer"):
        simulated.parse("gpus: [{uuid: GPU-a, xids: [79, x]}]\n")
    with pytest.raises(SimulatedFileError, match="at most 32 XIDs"):
        simulated.parse("gpus: [{uuid: GPU-a, xids: [" + ", ".join(["79"] * 33) + "]}]\n")


def test_simulated_aliases_and_long_text_are_refused() -> None:
    """A GPU name made of aliases became a 39 MB string; aliases and long text are refused."""
    with pytest.raises(SimulatedFileError, match="aliases"):
        simulated.parse("x: &x [a, a]\ngpus: [{uuid: GPU-a, name: *x}]\n")
    with pytest.raises(SimulatedFileError, match=r"gpus\[0\]\.name: must be at most 256"):
        simulated.parse("gpus: [{uuid: GPU-a, name: " + "n" * 5000 + "}]\n")
    with pytest.raises(SimulatedFileError, match=r"gpus\[0\]\.uuid: must be at most 256"):
        simulated.parse("gpus: [{uuid: GPU-" + "u" * 5000 + "}]\n")


async def test_simulated_file_size_is_bounded(short_dir: Path) -> None:
    path = short_dir / "devices.yaml"
    path.write_text(h100_node() + "#" * 5000 + "\n")
    with pytest.raises(SimulatedFileError, match="more than the limit of 4096"):
        async with SimulatedBackend(path, max_bytes=4096):
            pass
    async with SimulatedBackend(path, max_bytes=8192) as backend:
        assert len(await backend.discover()) == 8
        path.write_text(h100_node({0: "x"}) + "#" * 9000 + "\n")
        assert await backend.reload() is False  # too large: the last good list stays
        assert len(await backend.discover()) == 8


def test_simulated_device_nodes_false_hands_out_none() -> None:
    """On a node without /dev/nvidia<minor> (make cluster-e2e's) the GPUs have no device
    node: a DeviceSpec or CDI device node for a missing path makes the runtime refuse."""
    assert simulated.parse("gpus: [{uuid: GPU-a, minor: 3}]\n").gpus[0].paths == ("/dev/nvidia3",)
    node = simulated.parse("device_nodes: false\ngpus: [{uuid: GPU-a, minor: 3}]\n")
    assert node.gpus[0].paths == ()
    with pytest.raises(SimulatedFileError, match="device_nodes: must be true or false"):
        simulated.parse("device_nodes: no-thanks\ngpus: [{uuid: GPU-a}]\n")
