"""/metrics, /healthz and /readyz while the plugin runs against the kubelet stand-in."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from grpclib import GRPCError

from aiodp.config.model import RESOURCE_GPU
from aiodp.ops import probes, statuscli
from aiodp.standins.kubelet import FakeKubelet
from tests.harness import Running, h100_node, next_update, running, scrape, write_atomically

pytestmark = pytest.mark.integration


async def raw(address: str, data: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    writer.write_eof()  # a client that sends this much and no more
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


async def status(rp: Running, path: str) -> tuple[int, str]:
    assert rp.state.endpoint is not None
    answer = await raw(rp.state.endpoint.address, f"GET {path} HTTP/1.1\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


PLUGIN_OPTIONS = {"metrics_address": "127.0.0.1:0"}


XID = (
    "aiodp_health_transitions_total"
    '{direction="to_unhealthy",reason="XID 79",resource="nvidia.com/gpu"}'
)
UNHEALTHY = 'aiodp_devices{health="Unhealthy",resource="nvidia.com/gpu"}'
BAD_ALLOC = (
    'aiodp_requests_total{code="INVALID_ARGUMENT",method="Allocate",resource="nvidia.com/gpu"}'
)
OK_ALLOC = 'aiodp_requests_total{code="OK",method="Allocate",resource="nvidia.com/gpu"}'
REGS = 'aiodp_registrations_total{resource="nvidia.com/gpu",result="success"}'
RESTARTS = "aiodp_kubelet_restarts_total"
STREAMS = 'aiodp_listandwatch_streams{resource="nvidia.com/gpu"}'


async def test_observability_metrics_move_with_events(plugin: Running) -> None:
    before = await scrape(plugin)
    assert before[UNHEALTHY] == 0
    assert before['aiodp_devices{health="Healthy",resource="nvidia.com/gpu"}'] == 8
    assert before[STREAMS] >= 1
    assert before['aiodp_backend_initialized{backend="simulated"}'] == 1
    assert any(k.startswith("aiodp_build_info{") for k in before)

    write_atomically(plugin.devices_file, h100_node({2: "XID 79 (simulated)"}))
    await next_update(plugin.k, lambda u: any(d.health == "Unhealthy" for d in u.devices))
    with pytest.raises(GRPCError):
        await plugin.k.allocate(RESOURCE_GPU, ["GPU-nope"])
    await plugin.k.allocate(RESOURCE_GPU, [plugin.k.devices(RESOURCE_GPU)[0].id])
    await plugin.k.restart()
    await plugin.k.registrations.get()
    await plugin.k.registrations.get()
    await next_update(plugin.k, lambda u: bool(u.devices) and not u.ended)

    after = await scrape(plugin)
    assert after[UNHEALTHY] == 1
    sick = plugin.k.devices(RESOURCE_GPU)[2].id
    key = f'aiodp_device_healthy{{device="{sick}",reason="XID 79",resource="nvidia.com/gpu"}}'
    assert after[key] == 0
    assert after[XID] == before.get(XID, 0) + 1
    assert after[BAD_ALLOC] == before.get(BAD_ALLOC, 0) + 1
    assert after[OK_ALLOC] == before.get(OK_ALLOC, 0) + 1
    assert after[REGS] == before[REGS] + 1
    assert after[RESTARTS] == before.get(RESTARTS, 0) + 1
    assert (
        after['aiodp_request_duration_seconds_count{method="Allocate",resource="nvidia.com/gpu"}']
        >= 2
    )


async def test_observability_readyz_follows_registration(short_dir: Path) -> None:
    async with running(short_dir, kubelet=False, metrics_address="127.0.0.1:0") as rp:
        await rp.state.wait_for(lambda: rp.state.endpoint is not None)
        code, body = await status(rp, "/readyz")
        assert code == 503
        assert body.strip()
        assert "\n" not in body.strip()  # one line: starting, discovering or waiting
        assert (await status(rp, "/healthz"))[0] == 200
        async with FakeKubelet(short_dir) as kubelet:
            await kubelet.registrations.get()
            await next_update(kubelet, lambda u: bool(u.devices))
            await rp.ready.wait()
            assert await status(rp, "/readyz") == (200, "ok\n")
        # the kubelet went away: its stream ended, we are registering again
        await rp.state.wait_for(lambda: not rp.state.registered)
        code, body = await status(rp, "/readyz")
        assert code == 503
        assert body.strip()
        assert "\n" not in body.strip()  # one line


async def test_observability_healthz_503_when_an_eternal_task_died(plugin: Running) -> None:
    assert await status(plugin, "/healthz") == (200, "ok\n")
    victim = next(t for t in plugin.state.eternal if t.get_name() == "health")
    victim.cancel()  # a task that dies without taking the group down
    await asyncio.wait([victim])
    code, body = await status(plugin, "/healthz")
    assert code == 503
    assert "task(s) ended: health" in body


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"garbage\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"b" * 20000 + b"\r\n\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
        (b"GET /metr", 400),
    ],
)
async def test_observability_bad_http_gets_4xx(
    plugin: Running, request_bytes: bytes, code: int
) -> None:
    assert plugin.state.endpoint is not None
    answer = await raw(plugin.state.endpoint.address, request_bytes)
    assert int(answer.split()[1]) == code
    # the plugin is undisturbed
    assert (await status(plugin, "/healthz"))[0] == 200
    resp = await plugin.k.allocate(RESOURCE_GPU, [plugin.k.devices(RESOURCE_GPU)[0].id])
    assert len(resp.container_responses) == 1


async def test_observability_head_has_no_body(plugin: Running) -> None:
    assert plugin.state.endpoint is not None
    answer = await raw(plugin.state.endpoint.address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert answer.endswith(b"\r\n\r\n")


async def test_observability_idle_connection_flood_is_capped(plugin: Running) -> None:
    """Idle HTTP connections beyond the cap are closed at once; once they go, probes answer."""
    assert plugin.state.endpoint is not None
    host, _, port = plugin.state.endpoint.address.rpartition(":")
    held = [await asyncio.open_connection(host, int(port)) for _ in range(probes.MAX_CONNECTIONS)]
    extra_reader, extra_writer = await asyncio.open_connection(host, int(port))
    async with asyncio.timeout(5):
        assert await extra_reader.read() == b""  # closed without an answer
    extra_writer.close()
    for reader, writer in held:
        writer.write_eof()  # an incomplete request: answered 400, then closed
        async with asyncio.timeout(5):
            assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
    assert (await status(plugin, "/healthz"))[0] == 200
    resp = await plugin.k.allocate(RESOURCE_GPU, [plugin.k.devices(RESOURCE_GPU)[0].id])
    assert len(resp.container_responses) == 1


async def test_observability_status_shows_the_node(plugin: Running) -> None:
    """/status: read-only JSON of what the plugin knows (resources, devices, config)."""
    assert plugin.state.endpoint is not None
    write_atomically(plugin.devices_file, h100_node({2: "XID 79 (simulated)"}))
    await next_update(plugin.k, lambda u: any(d.health == "Unhealthy" for d in u.devices))
    code, body = await status(plugin, "/status")
    assert code == 200
    doc = json.loads(body)
    assert doc["ready"] == "ok"
    (gpu,) = doc["resources"]
    assert (gpu["name"], gpu["registered"], gpu["streams"]) == ("nvidia.com/gpu", True, 1)
    devices = {d["index"]: d for d in doc["devices"]}
    assert devices["2"]["health"] == "Unhealthy"
    assert devices["2"]["reason"] == "XID 79 (simulated)"
    assert devices["2"]["since"] is not None
    assert devices["0"]["numa"] == 0
    assert devices["0"]["nvlink_peers"] == {"1": 4, "2": 4, "3": 4, "4": 2}
    assert doc["config"]["metrics_address"]["source"] == "flag or env"
    kubelet = doc["kubelet"]
    assert kubelet["socket"] == str(plugin.config.kubelet_socket)
    assert kubelet["restarts_seen"] == 0
    assert kubelet["since"] is not None
    text = statuscli.table(doc)
    assert "XID 79 (simulated)" in text
    assert "nvidia.com/gpu" in text
    assert f"kubelet: {plugin.config.kubelet_socket} (inode " in text

    await plugin.k.restart()
    await plugin.state.wait_for(lambda: plugin.state.registrations >= 2)
    _, body = await status(plugin, "/status")
    assert json.loads(body)["kubelet"]["restarts_seen"] == 1
