"""DevicePluginService through grpclib's in-memory channel: statuses and messages."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.testing import ChannelFor

from aiodp import server, topology
from aiodp.api import v1beta1 as api
from aiodp.config import Config
from aiodp.devices import DeviceRegistry, Health, Resource
from tests.builders import Fixed, gpu, replica, set_health, to_api

RES = "nvidia.com/gpu"


def service(**options: object) -> server.DevicePluginService:
    devs = [gpu(i, numa_node=i // 2) for i in range(4)]
    devs.append(gpu(4, uuid="GPU-x", paths=()))
    reg = DeviceRegistry(devs)
    set_health(reg, ["GPU-3"], Health.UNHEALTHY, "XID 79")
    topo = topology.build([(d.uuid, int(d.index), d.numa_node) for d in devs])
    fixed = Fixed(dataclasses.replace(Config(), **options), topo)  # type: ignore[arg-type]
    return server.DevicePluginService(Resource(RES), reg, lambda: fixed)


async def test_server_options_match_registration() -> None:
    svc = service()
    async with ChannelFor([svc]) as channel:
        opts = await api.DevicePluginStub(channel).get_device_plugin_options(api.Empty())
    assert opts == server.OPTIONS
    assert opts.get_preferred_allocation_available
    assert not opts.pre_start_required


@pytest.mark.parametrize(
    ("ids", "status", "text"),
    [
        (["GPU-9"], Status.INVALID_ARGUMENT, "unknown device id(s): GPU-9"),
        (["GPU-3"], Status.FAILED_PRECONDITION, "unhealthy device id(s): GPU-3 (GPU-3: XID 79)"),
    ],
)
async def test_server_allocate_errors(ids: list[str], status: Status, text: str) -> None:
    async with ChannelFor([service()]) as channel:
        stub = api.DevicePluginStub(channel)
        with pytest.raises(GRPCError) as err:
            await stub.allocate(
                api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(ids)])
            )
        assert err.value.status is status
        assert err.value.message == text
        ok = await stub.allocate(
            api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(["GPU-0"])])
        )
        assert ok.container_responses[0].envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0"}


async def test_server_preferred_prefers_one_numa_node() -> None:
    async with ChannelFor([service()]) as channel:
        stub = api.DevicePluginStub(channel)
        resp = await stub.get_preferred_allocation(
            api.PreferredAllocationRequest(
                container_requests=[
                    api.ContainerPreferredAllocationRequest(
                        available_deviceIDs=["GPU-2", "GPU-1", "GPU-0"],
                        must_include_deviceIDs=["GPU-1"],
                        allocation_size=2,
                    ),
                    api.ContainerPreferredAllocationRequest(
                        available_deviceIDs=["GPU-2", "GPU-0"], allocation_size=1
                    ),
                ]
            )
        )
    assert [r.device_i_ds for r in resp.container_responses] == [["GPU-0", "GPU-1"], ["GPU-0"]]


async def test_server_list_and_watch_ends_cleanly_on_close() -> None:
    svc = service()
    async with ChannelFor([svc]) as channel:
        stub = api.DevicePluginStub(channel)
        received = []
        async with asyncio.TaskGroup() as tg:

            async def read() -> None:
                async for msg in stub.list_and_watch(api.Empty()):
                    received.append(msg)
                    if len(received) == 1:
                        await svc.close_streams(1)

            tg.create_task(read())
        (first,) = received
        assert [d.health for d in first.devices] == ["Healthy"] * 3 + ["Unhealthy", "Healthy"]
        assert first.devices[2].topology.nodes[0].id == 1  # type: ignore[union-attr]
        assert first.devices[4].topology is None  # unknown NUMA node: no TopologyInfo
        assert not svc.stream_lost.is_set()  # we ended it, not the kubelet
        assert svc.open_streams == 0


async def test_server_pre_start_is_a_no_op() -> None:
    async with ChannelFor([service()]) as channel:
        resp = await api.DevicePluginStub(channel).pre_start_container(
            api.PreStartContainerRequest(devices_ids=["GPU-0"])
        )
    assert resp == api.PreStartContainerResponse()


def test_server_snapshot_bytes_equal_the_generated_encoding() -> None:
    devs = [
        replica(i, n, resource=RES, numa_node=numa)
        for i, numa in ((0, 0), (1, None), (2, 1))
        for n in range(3)
    ]
    devs[4] = dataclasses.replace(devs[4], health=Health.UNHEALTHY, reason="x")
    fast = server.snapshot(devs)
    assert bytes(fast) == bytes(to_api(devs))
    assert fast.SerializeToString() == bytes(to_api(devs))
    assert api.ListAndWatchResponse.parse(bytes(fast)) == to_api(devs)
    assert bytes(server.snapshot([])) == b""
