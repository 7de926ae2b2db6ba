"""The patches for upstream in patches/ apply to the packages we pin, and change no answer."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from bench import upstream

ALL = sorted(p.name for p in upstream.PATCHES.glob("*.patch"))

ENCODINGS = """
from aiodp.gen.deviceplugin.v1beta1 import (AllocateResponse, ContainerAllocateResponse, DeviceSpec,
    ListAndWatchResponse, Device, TopologyInfo, NumaNode, PreferredAllocationResponse,
    ContainerPreferredAllocationResponse, DevicePluginOptions)
import betterproto2
messages = [
    AllocateResponse(container_responses=[ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": "GPU-0,GPU-1", "EMPTY": ""}, annotations={"a": "b"},
        devices=[DeviceSpec(container_path="/dev/nvidia0", host_path="/dev/nvidia0",
                            permissions="rw")])]),
    AllocateResponse(container_responses=[ContainerAllocateResponse()]),
    ListAndWatchResponse(devices=[Device(id="GPU-0", health="Healthy",
        topology=TopologyInfo(nodes=[NumaNode(id=0)])), Device(id="GPU-1", health="")]),
    PreferredAllocationResponse(container_responses=[
        ContainerPreferredAllocationResponse(device_i_ds=["GPU-1", "GPU-0"])]),
    DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True),
]
print(betterproto2.__version__, betterproto2.__file__)
for m in messages:
    print(bytes(m).hex() or "-", type(m).parse(bytes(m)) == m)

import asyncio, h2.connection
from grpclib.testing import ChannelFor
from aiodp.gen.deviceplugin.v1beta1 import DevicePluginBase, DevicePluginStub, AllocateRequest

class Plugin(DevicePluginBase):
    async def allocate(self, message):
        return messages[0]

async def call():
    async with ChannelFor([Plugin()]) as channel:  # h2 on both ends
        return await DevicePluginStub(channel).allocate(AllocateRequest())

print(asyncio.run(call()) == messages[0], h2.connection.__file__)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ALL)
def test_patch_applies_to_the_pinned_package(name: str) -> None:
    tree = upstream.patched_tree((name,))  # git apply fails on a patch that no longer fits
    package, _ = upstream._target(upstream.PATCHES / name)
    assert (tree / package / "__init__.py").exists()
    text = (upstream.PATCHES / name).read_text()
    assert text.count("+++ b/") >= 1
    assert "Written against" in text


@pytest.mark.timeout(60)
def test_patched_packages_encode_the_same_bytes_and_serve_a_call() -> None:
    tree = upstream.patched_tree()
    answers = {}
    for label, env in (("released", upstream.env_with(None)), ("patched", upstream.env_with(tree))):
        out = subprocess.run(
            [sys.executable, "-c", ENCODINGS], capture_output=True, text=True, check=True, env=env
        ).stdout.splitlines()
        answers[label] = out
    version, where = answers["patched"][0].split()
    assert where.startswith(str(tree))  # the patched copy was the one imported
    assert version == metadata.version("betterproto2")  # the static string matches the pin
    assert answers["patched"][1:-1] == answers["released"][1:-1]
    assert all(line.endswith(" True") for line in answers["patched"][1:-1])
    assert len(answers["patched"]) == 7
    served, h2_from = answers["patched"][-1].split()
    assert served == "True"
    assert h2_from.startswith(str(tree))


HPACK_SEQUENCE = """
import hpack
from hpack import HeaderTuple, NeverIndexedHeaderTuple
encoder, decoder = hpack.Encoder(), hpack.Decoder()
answer = [(b":status", b"200"), (b"content-type", b"application/grpc+proto")]
steps = [
    answer, answer, answer, [(b"grpc-status", b"0")], [(b"grpc-status", b"0")], answer,
    [(":status", "200"), ("content-type", "application/grpc+proto")],  # str, not bytes
    [HeaderTuple(b"x-a", b"1")], [NeverIndexedHeaderTuple(b"x-a", b"1")],
    [HeaderTuple(b"x-a", b"1")], [(b"x-b", b"2", True)], [(b"x-b", b"2", True)],
    [(b"x-b", b"2")], [(b"x-b", b"2")], {b"x-c": b"3", b":status": b"404"},
    {b"x-c": b"3", b":status": b"404"}, "RESIZE 60", answer, answer, "RESIZE 4096",
    answer, answer, [(b"x-big", b"v" * 5000)], answer, answer, [(b"x-n", 7)], [(b"x-n", 7)],
    answer, answer, answer, answer, answer, answer, answer, answer, answer, answer,
]
steps += [[(b"x-%d" % i, b"v")] for i in range(40)] + [answer, answer]
for step in steps:
    if isinstance(step, str):
        encoder.header_table_size = int(step.split()[1])
        print(step)
        continue
    block = encoder.encode(step)
    decoder.header_table_size = encoder.header_table_size
    print(block.hex(), len(decoder.decode(block)))
print(len(getattr(encoder, "_blocks", ())), hpack.__file__)
"""


@pytest.mark.timeout(60)
def test_patched_hpack_encodes_every_block_as_released() -> None:
    tree = upstream.patched_tree(("hpack-reuse-unchanged-header-blocks.patch",))
    out = {}
    for label, env in (("released", upstream.env_with(None)), ("patched", upstream.env_with(tree))):
        out[label] = subprocess.run(
            [sys.executable, "-c", HPACK_SEQUENCE], capture_output=True, text=True, env=env,
            check=True,
        ).stdout.splitlines()  # fmt: skip
    kept, where = out["patched"][-1].split()
    assert where.startswith(str(tree))
    assert int(kept) > 0  # blocks were kept for reuse
    assert out["released"][-1].split()[0] == "0"
    assert out["patched"][:-1] == out["released"][:-1]
    assert len(out["patched"]) == 80
