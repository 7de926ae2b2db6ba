"""The wire contract: routes, cardinality, and field numbers pinned by hand-built bytes."""

from __future__ import annotations

import pytest
from grpclib.const import Cardinality

from aiodp.gen.deviceplugin import v1beta1 as api


def test_wire_routes_and_cardinality() -> None:
    plugin = api.DevicePluginBase().__mapping__()
    assert set(plugin) == {
        "/v1beta1.DevicePlugin/GetDevicePluginOptions",
        "/v1beta1.DevicePlugin/ListAndWatch",
        "/v1beta1.DevicePlugin/GetPreferredAllocation",
        "/v1beta1.DevicePlugin/Allocate",
        "/v1beta1.DevicePlugin/PreStartContainer",
    }
    streaming = {path for path, h in plugin.items() if h.cardinality is not Cardinality.UNARY_UNARY}
    assert streaming == {"/v1beta1.DevicePlugin/ListAndWatch"}
    assert plugin["/v1beta1.DevicePlugin/ListAndWatch"].cardinality is Cardinality.UNARY_STREAM
    assert set(api.RegistrationBase().__mapping__()) == {"/v1beta1.Registration/Register"}


def s(field: int, value: bytes) -> bytes:
    """A length-delimited field (wire type 2) with a one-byte length."""
    assert len(value) < 128
    return bytes([field << 3 | 2, len(value)]) + value


def v(field: int, value: int) -> bytes:
    """A varint field (wire type 0) with a small value."""
    assert value < 128
    return bytes([field << 3, value])


CASES = [
    (
        api.DevicePluginOptions(pre_start_required=True, get_preferred_allocation_available=True),
        v(1, 1) + v(2, 1),
    ),
    (
        api.RegisterRequest(
            version="v1beta1",
            endpoint="e.sock",
            resource_name="a/b",
            options=api.DevicePluginOptions(pre_start_required=True),
        ),
        s(1, b"v1beta1") + s(2, b"e.sock") + s(3, b"a/b") + s(4, v(1, 1)),
    ),
    (
        api.ListAndWatchResponse(
            devices=[
                api.Device(
                    id="G", health="Healthy", topology=api.TopologyInfo(nodes=[api.NumaNode(id=1)])
                )
            ]
        ),
        s(1, s(1, b"G") + s(2, b"Healthy") + s(3, s(1, v(1, 1)))),
    ),
    (api.PreStartContainerRequest(devices_ids=["a", "b"]), s(1, b"a") + s(1, b"b")),
    (
        api.PreferredAllocationRequest(
            container_requests=[
                api.ContainerPreferredAllocationRequest(
                    available_deviceIDs=["a"], must_include_deviceIDs=["b"], allocation_size=3
                )
            ]
        ),
        s(1, s(1, b"a") + s(2, b"b") + v(3, 3)),
    ),
    (
        api.PreferredAllocationResponse(
            container_responses=[api.ContainerPreferredAllocationResponse(device_i_ds=["a"])]
        ),
        s(1, s(1, b"a")),
    ),
    (
        api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=["x"])]),
        s(1, s(1, b"x")),
    ),
    (
        api.AllocateResponse(
            container_responses=[
                api.ContainerAllocateResponse(
                    envs={"K": "V"},
                    mounts=[api.Mount(container_path="/c", host_path="/h", read_only=True)],
                    devices=[api.DeviceSpec(container_path="/c", host_path="/h", permissions="rw")],
                    annotations={"A": "B"},
                    cdi_devices=[api.CdiDevice(name="n/c=1")],
                )
            ]
        ),
        s(
            1,
            s(1, s(1, b"K") + s(2, b"V"))
            + s(2, s(1, b"/c") + s(2, b"/h") + v(3, 1))
            + s(3, s(1, b"/c") + s(2, b"/h") + s(3, b"rw"))
            + s(4, s(1, b"A") + s(2, b"B"))
            + s(5, s(1, b"n/c=1")),
        ),
    ),
]


@pytest.mark.parametrize(("message", "wire"), CASES, ids=lambda x: type(x).__name__)
def test_wire_field_numbers(message: object, wire: bytes) -> None:
    assert bytes(message) == wire  # type: ignore[call-overload]
    assert type(message).parse(wire) == message  # type: ignore[attr-defined]


def test_wire_numa_node_zero_is_an_empty_message() -> None:
    dev = api.Device(
        id="G", health="Healthy", topology=api.TopologyInfo(nodes=[api.NumaNode(id=0)])
    )
    assert bytes(dev) == s(1, b"G") + s(2, b"Healthy") + s(3, s(1, b""))
