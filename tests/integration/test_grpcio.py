"""Talk to the plugin socket with grpcio (grpc-go-like framing): a peer nobody here wrote."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.grpcio_stubs import api_pb2, api_pb2_grpc
from tests.harness import Running, h100_node

pytestmark = pytest.mark.integration


PLUGIN_OPTIONS = {"node": h100_node({7: "XID 48 (simulated)"})}


@pytest.fixture(params=["localhost", "socket-path"])
async def stub(
    plugin: Running, request: pytest.FixtureRequest
) -> AsyncIterator[api_pb2_grpc.DevicePluginStub]:
    path = plugin.config.socket_path("nvidia.com/gpu")
    # the kubelet sends `localhost`; the plugin watcher sends the socket path
    authority = "localhost" if request.param == "localhost" else str(path).replace("/", "%2F")
    async with grpc.aio.insecure_channel(
        f"unix://{path}", options=[("grpc.default_authority", authority)]
    ) as channel:
        yield api_pb2_grpc.DevicePluginStub(channel)


def ids(plugin: Running) -> list[str]:
    return [d.id for d in plugin.k.devices("nvidia.com/gpu")]


async def test_grpcio_options(stub: api_pb2_grpc.DevicePluginStub) -> None:
    opts = await stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
    assert opts.get_preferred_allocation_available is True
    assert opts.pre_start_required is False


async def test_grpcio_allocate_round_trip(
    plugin: Running, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    gpus = ids(plugin)
    req = api_pb2.AllocateRequest(
        container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=[gpus[1], gpus[0]]),
            api_pb2.ContainerAllocateRequest(devices_ids=[gpus[2], gpus[2]]),  # init reuse
        ]
    )
    resp = await stub.Allocate(req, timeout=5)
    assert len(resp.container_responses) == 2
    first, second = resp.container_responses
    assert first.envs["NVIDIA_VISIBLE_DEVICES"] == f"{gpus[1]},{gpus[0]}"
    assert second.envs["NVIDIA_VISIBLE_DEVICES"] == gpus[2]
    again = await stub.Allocate(req, timeout=5)
    assert again == resp  # idempotent: the kubelet may ask twice


async def test_grpcio_allocate_empty_request(stub: api_pb2_grpc.DevicePluginStub) -> None:
    resp = await stub.Allocate(api_pb2.AllocateRequest(), timeout=5)
    assert len(resp.container_responses) == 0


async def test_grpcio_allocate_unknown_id_is_invalid_argument(
    plugin: Running, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    req = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["GPU-nope"])]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Allocate(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GPU-nope" in (err.value.details() or "")
    # still serving
    ok = await stub.Allocate(
        api_pb2.AllocateRequest(
            container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=[ids(plugin)[0]])]
        ),
        timeout=5,
    )
    assert len(ok.container_responses) == 1


async def test_grpcio_allocate_unhealthy_is_failed_precondition(
    plugin: Running, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    sick = ids(plugin)[7]
    req = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=[sick])]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Allocate(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert sick in (err.value.details() or "")
    assert "XID 48" in (err.value.details() or "")


async def test_grpcio_preferred_allocation(
    plugin: Running, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    gpus = ids(plugin)
    req = api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=list(reversed(gpus[:7])),
                must_include_deviceIDs=[gpus[2]],
                allocation_size=2,
            )
        ]
    )
    resp = await stub.GetPreferredAllocation(req, timeout=5)
    (answer,) = resp.container_responses
    assert len(answer.deviceIDs) == 2
    assert gpus[2] in answer.deviceIDs
    assert set(answer.deviceIDs) <= set(gpus[:4])  # NVLinked, on GPU 2's NUMA node


@pytest.mark.parametrize(
    ("available", "must", "size"),
    [([0, 1], [], 0), ([0, 1], [], 3), ([0, 1], [2], 1), (["nope"], [], 1)],
)
async def test_grpcio_preferred_allocation_bad_request(
    plugin: Running,
    stub: api_pb2_grpc.DevicePluginStub,
    available: list[int | str],
    must: list[int],
    size: int,
) -> None:
    gpus = ids(plugin)

    def name(i: int | str) -> str:
        return gpus[i] if isinstance(i, int) else i

    req = api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=[name(i) for i in available],
                must_include_deviceIDs=[name(i) for i in must],
                allocation_size=size,
            )
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetPreferredAllocation(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_grpcio_pre_start_container_is_a_no_op(
    plugin: Running, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    resp = await stub.PreStartContainer(
        api_pb2.PreStartContainerRequest(devices_ids=ids(plugin)[:1]), timeout=5
    )
    assert resp == api_pb2.PreStartContainerResponse()


async def test_grpcio_list_and_watch_sees_a_fault(
    plugin: Running, stub: api_pb2_grpc.DevicePluginStub
) -> None:
    call = stub.ListAndWatch(api_pb2.Empty())
    stream = call.__aiter__()
    first = await asyncio.wait_for(stream.__anext__(), 5)
    assert [d.health for d in first.devices].count("Unhealthy") == 1
    assert first.devices[0].topology.nodes[0].ID == 0
    assert first.devices[7].topology.nodes[0].ID == 1
    plugin.devices_file.write_text(h100_node({0: "a", 7: "XID 48 (simulated)"}))
    second = await asyncio.wait_for(stream.__anext__(), 5)
    assert [d.health for d in second.devices].count("Unhealthy") == 2
    call.cancel()
