"""Pod attribution: mapping the kubelet's pod-resources answer to our GPUs, and reading the
socket (absent, refusing, answering) through the fake, also with a grpcio client."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from grpclib.const import Status

from aiodp.gen.podresources.v1 import (
    ClaimResource,
    ContainerDevices,
    ContainerResources,
    DynamicResource,
    ListPodResourcesResponse,
    PodResources,
)
from aiodp.ops import podresources
from aiodp.ops.podresources import Attribution, Holder
from aiodp.standins.podresources import FakePodResources
from tests.grpcio_stubs import podres_pb2, podres_pb2_grpc

OURS = {
    ("nvidia.com/gpu", "GPU-a"): "GPU-a",
    ("nvidia.com/gpu", "GPU-b::0"): "GPU-b",
    ("nvidia.com/gpu", "GPU-b::1"): "GPU-b",
    ("nvidia.com/mig-1g.10gb", "MIG-c1"): "GPU-c",
}


def physical(resource: str, device_id: str) -> str | None:
    return OURS.get((resource, device_id))


def answer(*pods: tuple[str, str, str, str, list[str]]) -> ListPodResourcesResponse:
    return ListPodResourcesResponse(
        pod_resources=[
            PodResources(
                name=pod,
                namespace=ns,
                containers=[
                    ContainerResources(
                        name=c, devices=[ContainerDevices(resource_name=r, device_ids=ids)]
                    )
                ],
            )
            for ns, pod, c, r, ids in pods
        ]
    )


def test_holders_map_replicas_and_mig_devices_to_their_gpu() -> None:
    got = podresources.holders(
        answer(
            ("ml", "train", "main", "nvidia.com/gpu", ["GPU-a", "GPU-b::1"]),
            ("ml", "infer", "srv", "nvidia.com/gpu", ["GPU-b::0"]),
            ("ml", "small", "c", "nvidia.com/mig-1g.10gb", ["MIG-c1"]),
            ("x", "other", "c", "example.com/fpga", ["GPU-a"]),  # not our resource
            ("x", "gone", "c", "nvidia.com/gpu", ["GPU-zzz"]),  # not a device of ours
        ),
        physical,
    )
    assert got == {
        "GPU-a": (Holder("ml", "train", "main", "nvidia.com/gpu", "GPU-a"),),
        "GPU-b": (
            Holder("ml", "infer", "srv", "nvidia.com/gpu", "GPU-b::0"),
            Holder("ml", "train", "main", "nvidia.com/gpu", "GPU-b::1"),
        ),
        "GPU-c": (Holder("ml", "small", "c", "nvidia.com/mig-1g.10gb", "MIG-c1"),),
    }


def test_holders_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(podresources, "MAX_HOLDERS", 3)
    pods = [("ns", f"p{i}", "c", "nvidia.com/gpu", ["GPU-a"]) for i in range(10)]
    got = podresources.holders(answer(*pods), physical)
    assert sum(len(h) for h in got.values()) == 3
    long = podresources.holders(answer(("n" * 500, "p" * 500, "c", "nvidia.com/gpu", ["GPU-a"])),
                                physical)  # fmt: skip
    (h,) = long["GPU-a"]
    assert (len(h.namespace), len(h.pod)) == (63, 253)


def problem(att: Attribution) -> str:
    return att.problem or ""


async def test_attribution_absent_then_answering_then_refusing(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiodp.ops.podresources")
    sock = short_dir / "pr.sock"
    att = Attribution(sock, physical)
    await att.refresh()
    await att.refresh()
    assert att.holders == {}
    assert "socket is absent" in problem(att)
    assert caplog.text.count("cannot read") == 1  # one line, not one per reading
    async with FakePodResources(sock) as fake:
        fake.assign("ml", "train", "main", "nvidia.com/gpu", ["GPU-a"])
        await att.refresh()
        assert problem(att) == ""
        assert list(att.holders) == ["GPU-a"]
        assert "answers again" in caplog.text
        fake.release("ml", "train")  # the pod ended: its series go
        await att.refresh()
        assert att.holders == {}
        fake.assign("ml", "next", "main", "nvidia.com/gpu", ["GPU-b::0"])
        fake.refuse = Status.PERMISSION_DENIED
        await att.refresh()
        assert att.holders == {}
        assert problem(att).startswith("PERMISSION_DENIED")
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1
        assert fake.calls == 3  # the two reads before it listened never reached it


async def test_fake_pod_resources_answers_a_grpcio_client(short_dir: Path) -> None:
    sock = short_dir / "pr.sock"
    async with FakePodResources(sock) as fake:
        fake.assign("ml", "train", "main", "nvidia.com/gpu", ["GPU-a", "GPU-b::1"])
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            stub = podres_pb2_grpc.PodResourcesListerStub(channel)
            got = await stub.List(podres_pb2.ListPodResourcesRequest(), timeout=5)
    (pod,) = got.pod_resources
    assert (pod.namespace, pod.name) == ("ml", "train")
    (container,) = pod.containers
    assert container.name == "main"
    assert [(d.resource_name, list(d.device_ids)) for d in container.devices] == [
        ("nvidia.com/gpu", ["GPU-a", "GPU-b::1"])
    ]


def claims_answer(entries: int, *, ours: int = 1) -> ListPodResourcesResponse:
    """One pod whose container holds `entries` claimed devices, the first `ours` of them in
    our driver's pool."""
    resources = [
        ClaimResource(driver_name="gpu.aiodp.io" if i < ours else "fpga.example.com",
                      pool_name="node-1", device_name=f"gpu-{i}")
        for i in range(entries)
    ]  # fmt: skip
    dynamic = DynamicResource(
        claim_name="train-gpu", claim_namespace="ml", claim_resources=resources
    )
    return ListPodResourcesResponse(
        pod_resources=[
            PodResources(name="train", namespace="ml", containers=[
                ContainerResources(name="main", dynamic_resources=[dynamic])
            ])
        ]
    )  # fmt: skip


def claimed(driver: str, pool: str, name: str) -> str | None:
    return f"GPU-{name}" if (driver, pool) == ("gpu.aiodp.io", "node-1") else None


def test_holders_of_dra_claims_name_the_claim() -> None:
    got = podresources.holders(claims_answer(2, ours=1), physical, claimed)
    assert got == {
        "GPU-gpu-0": (
            Holder("ml", "train", "main", "dra:gpu.aiodp.io", "gpu-0", "ml", "train-gpu"),
        ),
    }


def test_holders_of_10000_claimed_devices_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A hostile peer's 10,000 dynamic_resources entries: a bounded walk, bounded holders."""
    got = podresources.holders(claims_answer(20_000, ours=10_000), physical, claimed)
    assert sum(len(h) for h in got.values()) == podresources.MAX_HOLDERS
    many = podresources.holders(claims_answer(20_000, ours=0), physical, claimed)
    assert many == {}
    assert f"over {podresources.MAX_CLAIM_RESOURCES} claimed devices" in caplog.text
