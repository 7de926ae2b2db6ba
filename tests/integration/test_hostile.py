"""What a hostile peer sends over the plugin socket: bounded answers, bounded logs, no stall.

Each case runs the attack itself, with grpcio (a peer nobody here wrote).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from tests.grpcio_stubs import api_pb2, api_pb2_grpc
from tests.harness import Running, h100_node, next_update, write_atomically

pytestmark = pytest.mark.integration

HUGE = "GPU-" + "x" * (1 << 20)  # a 1 MB device ID: echoed whole, it froze the loop 105 s


@pytest.fixture
async def stub(plugin: Running) -> AsyncIterator[api_pb2_grpc.DevicePluginStub]:
    path = plugin.config.socket_path("nvidia.com/gpu")
    async with grpc.aio.insecure_channel(
        f"unix://{path}", options=[("grpc.default_authority", "localhost")]
    ) as channel:
        yield api_pb2_grpc.DevicePluginStub(channel)


def allocate(*ids: str) -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=list(ids))]
    )


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return err.value


async def still_serving(plugin: Running, stub: api_pb2_grpc.DevicePluginStub) -> None:
    """Allocate answers and a health change still reaches the kubelet's stream."""
    gpu = plugin.k.devices("nvidia.com/gpu")[0].id
    resp = await stub.Allocate(allocate(gpu), timeout=5)
    assert resp.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == gpu
    write_atomically(plugin.devices_file, h100_node({1: "XID 79"}))
    await next_update(plugin.k, lambda u: any(d.health == "Unhealthy" for d in u.devices))


async def test_hostile_huge_id_in_allocate(
    plugin: Running, stub: api_pb2_grpc.DevicePluginStub, caplog: pytest.LogCaptureFixture
) -> None:
    err = await refused(stub.Allocate(allocate(HUGE), timeout=10))
    details = err.details() or ""
    assert "device ID of 1048580 characters (at most 256)" in details
    assert len(details) < 300
    await still_serving(plugin, stub)
    assert max(len(r.getMessage()) for r in caplog.records) < 2000


async def test_hostile_huge_id_in_preferred_allocation(
    plugin: Running, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    gpus = [d.id for d in plugin.k.devices("nvidia.com/gpu")]
    req = api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=[*gpus, HUGE], must_include_deviceIDs=[HUGE], allocation_size=1
            )
        ]
    )
    err = await refused(stub.GetPreferredAllocation(req, timeout=10))
    assert len(err.details() or "") < 300
    await still_serving(plugin, stub)


async def test_hostile_too_many_ids(plugin: Running, stub: api_pb2_grpc.DevicePluginStub) -> None:
    err = await refused(stub.Allocate(allocate(*(f"GPU-{i}" for i in range(20_000))), timeout=10))
    assert "20000 device IDs in one request; this node has 8 devices" in (err.details() or "")
    await still_serving(plugin, stub)


async def test_hostile_many_unknown_ids_are_listed_briefly(
    stub: api_pb2_grpc.DevicePluginStub,
) -> None:
    err = await refused(stub.Allocate(allocate(*(f"GPU-no-{i}" for i in range(40))), timeout=5))
    details = err.details() or ""
    assert details.startswith("unknown device id(s): GPU-no-0, GPU-no-1, GPU-no-2")
    assert details.endswith("and 35 more")


async def test_hostile_too_many_containers(stub: api_pb2_grpc.DevicePluginStub) -> None:
    req = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest() for _ in range(1000)]
    )
    err = await refused(stub.Allocate(req, timeout=5))
    assert "1000 container requests in one call" in (err.details() or "")


async def test_hostile_other_stream_does_not_blind_the_plugin(
    plugin: Running, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    """A monitor's ListAndWatch is not the kubelet's: when the kubelet's stream ends, the
    plugin re-registers even though the monitor's is still open, and /readyz says so."""
    monitor = stub.ListAndWatch(api_pb2.Empty())
    first = await monitor.read()
    assert len(first.devices) == 8
    assert plugin.state.readiness() is None
    await plugin.k.end_stream("nvidia.com/gpu")
    await plugin.state.wait_for(lambda: "the kubelet ended ListAndWatch" in plugin.state.reasons)
    await plugin.k.registrations.get()  # registered again
    await next_update(plugin.k, lambda u: bool(u.devices) and not u.ended)
    await plugin.state.wait_for(lambda: plugin.state.readiness() is None)
    assert plugin.state.registrations == 2
    monitor.cancel()


async def test_hostile_other_stream_ending_changes_nothing(
    plugin: Running, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    monitor = stub.ListAndWatch(api_pb2.Empty())
    await monitor.read()
    monitor.cancel()
    await plugin.state.wait_for(lambda: plugin.state.streams("nvidia.com/gpu") == 1)
    # the kubelet's stream still carries health changes, with no re-registration
    write_atomically(plugin.devices_file, h100_node({4: "XID 79"}))
    await next_update(plugin.k, lambda u: any(d.health == "Unhealthy" for d in u.devices))
    assert plugin.state.registrations == 1
    assert plugin.state.readiness() is None
