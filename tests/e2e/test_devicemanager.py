"""aiodp against the kubelet's own device manager (Go, k8s.io/kubernetes), at two versions.

Registration, the device list with NUMA, Allocate after GetPreferredAllocation with the
kubelet's checkpoint, health flips both ways, a config reload, and 200 kubelet restarts in
both cleanup modes (a clean Stop, a crash), where the kubelet creates kubelet.sock before it
listens (the ECONNREFUSED race).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

import inotify_simple
import pytest

from aiodp.kit import metrics
from tests.e2e.conftest import report
from tests.e2e.peer import DeviceManager, device_manager, versions
from tests.harness import Running, h100_node, running, write_atomically

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

GPU = "nvidia.com/gpu"
FLOOR = "aiodp.test/floor"
"""The grpc-go yardstick plugin's resource (tests/e2e/devicemanager/floor_new.go)."""
RESTARTS = 200


def plugins(directory: Path) -> Path:
    """The kubelet's device-plugins directory: apart from our files, since the device
    manager deletes everything in it but its checkpoint when it starts."""
    path = directory / "plugins"
    path.mkdir(exist_ok=True)
    return path


def plugin(directory: Path, **overrides: Any) -> Any:
    return running(
        directory, kubelet=False, kubelet_socket=plugins(directory) / "kubelet.sock", **overrides
    )


def uuids() -> list[str]:
    return [line.split()[-1] for line in h100_node().splitlines() if "uuid:" in line]


def checkpoint_devices(directory: Path, pod_uid: str) -> list[str]:
    """The device IDs the kubelet checkpointed for a pod (any version's layout)."""
    data = json.loads((directory / "kubelet_internal_checkpoint").read_text())["Data"]
    found: list[str] = []
    for entry in data["PodDeviceEntries"]:
        if entry["PodUID"] == pod_uid:
            ids = entry["DeviceIDs"]
            for value in ids.values() if isinstance(ids, dict) else [ids]:
                found += value
    return sorted(set(found))


async def test_e2e_registration_numa_and_allocate(version: str, short_dir: Path) -> None:
    async with device_manager(version, plugins(short_dir)) as dm, plugin(short_dir) as rp:
        await dm.wait(GPU, 8, 8)
        await rp.state.wait_for(lambda: rp.state.registrations >= 1)  # Register's answer
        assert rp.state.registrations == 1
        devices = (await dm.call("devices", resource=GPU))["devices"]
        assert devices == {u: [i // 4] for i, u in enumerate(uuids())}  # NUMA 0 and 1

        reply = await dm.call("allocate", resource=GPU, count=2, pod="p1")
        # the kubelet asked GetPreferredAllocation first: two NVLinked GPUs on NUMA 0
        assert reply["devices"] == sorted(uuids()[:2])
        visible = reply["envs"]["NVIDIA_VISIBLE_DEVICES"].split(",")
        assert sorted(visible) == reply["devices"]
        assert checkpoint_devices(plugins(short_dir), "uid-p1") == reply["devices"]
        values = metrics.samples(metrics.render()[0].decode())
        asked = "GetPreferredAllocation"
        key = f'aiodp_requests_total{{code="OK",method="{asked}",resource="nvidia.com/gpu"}}'
        assert values[key] >= 1

        reply = await dm.call("allocate", resource=GPU, count=4, pod="p2")
        assert set(reply["devices"]).isdisjoint(uuids()[:2])  # the kubelet keeps p1's
        assert checkpoint_devices(plugins(short_dir), "uid-p2") == reply["devices"]


async def test_e2e_health_flips_both_ways(version: str, short_dir: Path) -> None:
    async with device_manager(version, plugins(short_dir)) as dm, plugin(short_dir) as rp:
        await dm.wait(GPU, 8, 8)
        write_atomically(rp.devices_file, h100_node({3: "XID 79 (simulated)"}))
        await dm.wait(GPU, 8, 7)
        assert uuids()[3] not in (await dm.call("devices", resource=GPU))["devices"]
        write_atomically(rp.devices_file, h100_node())
        await dm.wait(GPU, 8, 8)
        await rp.state.wait_for(lambda: rp.state.registrations >= 1)
        assert rp.state.registrations == 1


async def test_e2e_config_reload(version: str, short_dir: Path) -> None:
    config = short_dir / "config.yaml"
    config.write_text("version: v1\n")
    sliced = (
        "version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n    resources:\n"
        "      - {name: nvidia.com/gpu, replicas: 4, devices: ['0']}\n"
    )
    async with (
        device_manager(version, plugins(short_dir)) as dm,
        plugin(short_dir, config_file=config) as rp,
    ):
        await dm.wait(GPU, 8, 8)
        write_atomically(config, sliced)
        await dm.wait("nvidia.com/gpu.shared", 4, 4)
        await dm.wait(GPU, 7, 7)
        reply = await dm.call("allocate", resource="nvidia.com/gpu.shared", count=1, pod="s1")
        assert reply["envs"]["NVIDIA_VISIBLE_DEVICES"] == uuids()[0]
        await rp.state.wait_for(lambda: rp.state.registrations >= 2)
        assert rp.state.registrations == 2  # the new resource; nvidia.com/gpu kept its own


async def until_logged(path: Path, text: str, count: int, within: float = 20) -> None:
    """Until `path` holds `count` lines containing `text` (inotify on its writes, bounded)."""
    with inotify_simple.INotify() as watch:
        watch.add_watch(path, inotify_simple.flags.MODIFY)
        try:
            async with asyncio.timeout(within):
                while (await asyncio.to_thread(path.read_text)).count(text) < count:
                    await asyncio.to_thread(watch.read, 100)
        except TimeoutError:
            content = await asyncio.to_thread(path.read_text)
            tail = "\n".join(content.splitlines()[-30:])
            raise AssertionError(
                f"{content.count(text)} of {count} lines with {text!r}; the log ends:\n{tail}"
            ) from None


@pytest.mark.parametrize("mode", ["stop", "crash"])
async def test_e2e_restarts_register_exactly_once_each(
    version: str, mode: str, short_dir: Path
) -> None:
    """200 kubelet restarts; the plugin runs as its own process (`aiodp serve`, JSON logs),
    so its timings are its own and not the test process's."""
    devices = short_dir / "devices.yaml"
    devices.write_text(h100_node())
    log = short_dir / "plugin.log"
    back, starts = [], []
    async with device_manager(version, plugins(short_dir)) as dm:
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aiodp", "serve", "--backend=simulated",
                f"--simulated-devices={devices}", "--metrics-address=",
                f"--kubelet-socket={plugins(short_dir) / 'kubelet.sock'}", "--log-format=json",
                stderr=err,
            )  # fmt: skip
        try:
            await dm.wait(GPU, 8, 8)
            for _ in range(RESTARTS):
                started = await (dm.restart() if mode == "stop" else dm.kill())
                starts.append(started)
                back.append(await dm.wait(GPU, 8, 8) - started)  # re-registered, list in
                # and our Register's answer is in before the next restart: a kubelet that is
                # restarted first rightly never gets its registration counted
                await until_logged(log, f"registered {GPU} with", len(back) + 1)
            await dm.call("allocate", resource=GPU, count=1, pod="after")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    registered = [x for x in lines if x["message"].startswith(f"registered {GPU} with")]
    assert len(registered) == RESTARTS + 1  # exactly one per kubelet
    backoffs = [x["message"] for x in lines if "retrying in" in x["message"]]
    assert backoffs == []  # a kubelet.sock that refused was retried within 80 ms, quietly
    opened = [
        _wall(x["time"])
        for x in lines
        if x["message"] == f"ListAndWatch opened for {GPU} by the kubelet"
    ]
    assert len(opened) == RESTARTS + 1
    reregistered = [t - s for t, s in zip(opened[1:], starts, strict=True)]
    report(
        f"Kubernetes {version}, {RESTARTS} restarts ({mode}): re-registered (the kubelet's "
        f"ListAndWatch open) {figures(reregistered)}; devices counted by the kubelet "
        f"{figures(back)}"
    )


def _wall(stamp: str) -> float:
    """Our JSON log time (UTC, milliseconds) as seconds since the epoch."""
    return (
        datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
        .replace(tzinfo=datetime.UTC)
        .timestamp()
    )


def figures(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p99 = ms[max(int(len(ms) * 0.99) - 1, 0)]
    return f"median {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"


async def test_e2e_driver_is_the_real_device_manager(version: str, short_dir: Path) -> None:
    """The peer answers like the kubelet: an unknown resource has no capacity."""
    async with DeviceManager(version, plugins(short_dir)) as dm:
        await dm.start()
        capacity = await dm.call("capacity")
        assert capacity["capacity"] == {}


async def restart_with_prebind(dm: DeviceManager, rp: Running, ms: int, mode: str) -> None:
    """Restart the kubelet with kubelet.sock bound `ms` before it serves (`refuse` or `hang`),
    and wait until the plugin registered with the new one.

    The kubelet counts our devices before our Register's answer is in: the first
    registration is awaited before the restart, which would otherwise make it moot (and
    rightly not counted). Every wait is bounded."""
    await dm.wait(GPU, 8, 8)
    async with asyncio.timeout(30):
        await rp.state.wait_for(lambda: rp.state.registrations >= 1)
    await dm.call("stop")
    await dm.call("start", prebind_ms=ms, prebind_mode=mode)
    await dm.wait(GPU, 8, 8)
    async with asyncio.timeout(30):
        await rp.state.wait_for(lambda: rp.state.registrations >= 2)


async def test_e2e_kubelet_sock_before_listen(
    version: str, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kubelet.sock is there 40 ms before the kubelet listens on it: the first Register gets
    ECONNREFUSED and listen() makes no inotify event. The plugin retries after 10 and 20 ms,
    then registers with the kubelet that starts, without the 0.5 s backoff."""
    caplog.set_level(logging.DEBUG, logger="aiodp.deviceplugin.registration")
    async with device_manager(version, plugins(short_dir)) as dm, plugin(short_dir) as rp:
        await restart_with_prebind(dm, rp, 40, "refuse")
    messages = [r.getMessage() for r in caplog.records]
    assert "kubelet.sock refused the connection; again in 10 ms" in messages
    assert [m for m in messages if "retrying in" in m] == []


async def test_e2e_kubelet_that_never_answers_is_abandoned(
    version: str, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kubelet.sock accepts connections but nobody answers for 200 ms, then the real kubelet
    starts: the Register in flight is abandoned when kubelet.sock changes, not after its
    deadline (120 s here; the kubelet's devices are awaited 20 s at most)."""
    async with (
        device_manager(version, plugins(short_dir)) as dm,
        plugin(short_dir, register_timeout=120.0) as rp,
    ):
        await restart_with_prebind(dm, rp, 200, "hang")


async def test_e2e_allocate_cost_against_a_grpc_go_plugin(short_dir: Path) -> None:
    """Through the newest kubelet's device manager, pod after pod: aiodp (its own process,
    uvloop) against the smallest device plugin in Go on grpc-go, both answering
    GetPreferredAllocation and Allocate for 1 of 8 devices. A figure, not an assertion."""
    newest = max(versions(), key=lambda v: [int(x) for x in v[1:].split(".")])
    devices = short_dir / "devices.yaml"
    devices.write_text(h100_node())
    async with device_manager(newest, plugins(short_dir)) as dm:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiodp", "serve", "--backend=simulated",
            f"--simulated-devices={devices}", "--metrics-address=", "--pod-resources-socket=",
            f"--kubelet-socket={plugins(short_dir) / 'kubelet.sock'}", "--log-level=warning",
        )  # fmt: skip
        try:
            await dm.wait(GPU, 8, 8)
            await dm.call("serve_floor", resource=FLOOR)
            await dm.wait(FLOOR, 8, 8)
            rounds: dict[str, list[float]] = {GPU: [], FLOOR: []}
            for i in range(4):  # interleaved, so that both see the same machine
                for resource in rounds:
                    reply = await dm.call(
                        "allocate_many", resource=resource, count=1, repeat=250,
                        pod=f"{resource.split('/')[-1]}-{i}", timeout=60,
                    )  # fmt: skip
                    rounds[resource] += [ns / 1e9 for ns in reply["took_ns"]]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    ours, go = (statistics.median(rounds[r]) for r in (GPU, FLOOR))
    assert len(rounds[GPU]) == len(rounds[FLOOR]) == 1000
    report(
        f"Kubernetes {newest}, device manager Allocate of 1 device (GetPreferredAllocation, "
        f"Allocate, bookkeeping), 1,000 pods each: aiodp {figures(rounds[GPU])}; a grpc-go "
        f"plugin {figures(rounds[FLOOR])}; aiodp / grpc-go = {ours / go:.2f}"
    )
