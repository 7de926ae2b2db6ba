"""DevicePluginService through grpclib's in-memory channel: statuses and messages."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.testing import ChannelFor

from aiodp.config.model import Config
from aiodp.deviceplugin import server
from aiodp.gen.deviceplugin import v1beta1 as api
from aiodp.gpus import topology
from aiodp.gpus.devices import DeviceRegistry, Health, Resource
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


def _allocate(*ids: str) -> api.AllocateRequest:
    return api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(list(ids))])


def _preferred(*ids: str, size: int = 1) -> api.PreferredAllocationRequest:
    return api.PreferredAllocationRequest(
        container_requests=[
            api.ContainerPreferredAllocationRequest(
                available_deviceIDs=list(ids), allocation_size=size
            )
        ]
    )


async def test_server_same_question_same_state_is_answered_from_the_encoded_answer() -> None:
    svc = service()
    first = await svc.allocate(_allocate("GPU-0"))
    again = await svc.allocate(_allocate("GPU-0"))
    assert again is first  # encoded once
    other = await svc.allocate(_allocate("GPU-1"))
    assert other is not first
    decoded = api.AllocateResponse.parse(bytes(again))
    assert decoded.container_responses[0].envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-0"}
    assert bytes(again) == again.SerializeToString()
    pref = await svc.get_preferred_allocation(_preferred("GPU-2", "GPU-1", "GPU-0", size=2))
    assert await svc.get_preferred_allocation(_preferred("GPU-2", "GPU-1", "GPU-0", size=2)) is pref
    assert api.PreferredAllocationResponse.parse(bytes(pref)).container_responses[
        0
    ].device_i_ds == [
        "GPU-0",
        "GPU-1",
    ]
    # the same IDs asked by GetPreferredAllocation and Allocate are two questions
    assert await svc.allocate(_allocate("GPU-0")) is first


async def test_server_answers_follow_health_and_live_settings() -> None:
    devs = [gpu(i) for i in range(2)]
    reg = DeviceRegistry(devs)
    settings = [Fixed(Config())]
    svc = server.DevicePluginService(Resource(RES), reg, lambda: settings[0])
    ok = await svc.allocate(_allocate("GPU-0"))
    set_health(reg, ["GPU-0"], Health.UNHEALTHY, "XID 79")
    with pytest.raises(GRPCError) as err:  # a new inventory: not the kept answer
        await svc.allocate(_allocate("GPU-0"))
    assert err.value.status is Status.FAILED_PRECONDITION
    set_health(reg, ["GPU-0"], Health.HEALTHY)
    back = await svc.allocate(_allocate("GPU-0"))
    assert back is not ok
    assert bytes(back) == bytes(ok)
    settings[0] = Fixed(Config(device_id_strategy="index"))  # a reload: new live settings
    indexed = await svc.allocate(_allocate("GPU-0"))
    assert api.AllocateResponse.parse(bytes(indexed)).container_responses[0].envs == {
        "NVIDIA_VISIBLE_DEVICES": "0"
    }


async def test_server_kept_answers_are_bounded() -> None:
    many = [replica(0, n, resource=RES) for n in range(server._Answers.MAX_IDS + 1)]
    fixed = Fixed(Config())
    svc = server.DevicePluginService(Resource(RES), DeviceRegistry(many), lambda: fixed)
    ids = [d.id for d in many]
    big = await svc.allocate(_allocate(*ids))  # names more IDs than a kept question may
    assert await svc.allocate(_allocate(*ids)) is not big
    assert await svc.allocate(_allocate(*ids[:-1])) is await svc.allocate(_allocate(*ids[:-1]))
    first = await svc.allocate(_allocate(ids[0]))
    newer = (
        [(i,) for i in ids[1:]] + [(ids[1], i) for i in ids[2:]] + [(ids[2], i) for i in ids[3:]]
    )
    for question in newer[: server._Answers.MAX_ANSWERS]:
        await svc.allocate(_allocate(*question))
    assert len(svc._answers._answers) == server._Answers.MAX_ANSWERS
    assert await svc.allocate(_allocate(ids[0])) is not first  # the oldest was dropped
