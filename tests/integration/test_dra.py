"""DRA from the same loop: registration through the plugin watcher, ResourceSlices, prepare and
unprepare with CDI specs and a checkpoint, the health stream; driven by a grpcio client (a
peer nobody here wrote) and the in-process API stand-in. `make e2e` runs the kubelet's own
plugin manager and DRA manager against a real kube-apiserver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from aiodp.config import resolve as cfg
from aiodp.config.model import Config
from aiodp.gpus import simulated
from aiodp.ops import statuscli
from aiodp.standins.testbed import GPUS
from tests.grpcio_stubs import dra_stubs
from tests.harness import Running, h100_node, next_update, running, write_atomically
from tests.kubeapi import FakeApi

pytestmark = pytest.mark.integration

NODE = "gpu-node-1"
DRIVER = "gpu.aiodp.io"
reg_pb, reg_grpc = dra_stubs("pluginregistration", "v1")
dra_pb, dra_grpc = dra_stubs("dra", "v1")
beta_pb, beta_grpc = dra_stubs("dra", "v1beta1")
health_pb, health_grpc = dra_stubs("dra-health", "v1alpha1")


def uuid(i: int) -> str:
    return f"GPU-{i:08x}-aiod-4d3e-8f00-{0x5EED0000 + i:012x}"


def dra_options(directory: Path, api: FakeApi, **extra: Any) -> dict[str, Any]:
    return {
        "node_name": NODE,
        "kubeconfig": api.kubeconfig(directory),
        "dra": True,
        "dra_devices": ("4", "5", "6", "7"),
        "dra_registry_dir": directory / "reg",
        "dra_plugins_dir": directory / "plugins",
        "dra_cdi_dir": directory / "cdi",
        "register_backoff": (0.05,),
        **extra,
    }


def claim(
    uid: str, devices: list[tuple[str, str]], config: list[Any] | None = None
) -> dict[str, Any]:
    """A ResourceClaim as the scheduler leaves it: allocated to (pool, device) pairs."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": "default", "name": f"claim-{uid}", "uid": uid},
        "status": {
            "allocation": {
                "devices": {
                    "results": [
                        {"request": "gpus", "driver": DRIVER, "pool": pool, "device": dev}
                        for pool, dev in devices
                    ],
                    "config": config or [],
                }
            }
        },
    }


def ref(uid: str, pb: Any = dra_pb) -> Any:
    return pb.Claim(namespace="default", name=f"claim-{uid}", uid=uid)


@contextlib.asynccontextmanager
async def channel(path: Path) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"unix://{path}") as ch:
        yield ch


async def prepare(rp: Running, *uids: str) -> Any:
    """NodePrepareResources (dra v1) for these claims, over a connection of its own."""
    async with channel(rp.config.dra_socket) as ch:
        return await dra_grpc.DRAPluginStub(ch).NodePrepareResources(
            dra_pb.NodePrepareResourcesRequest(claims=[ref(u) for u in uids])
        )


async def unprepare(rp: Running, *uids: str) -> Any:
    async with channel(rp.config.dra_socket) as ch:
        return await dra_grpc.DRAPluginStub(ch).NodeUnprepareResources(
            dra_pb.NodeUnprepareResourcesRequest(claims=[ref(u) for u in uids])
        )


async def register(rp: Running) -> Any:
    """What the kubelet's plugin watcher does: GetInfo, then say it registered us."""
    await rp.state.wait_for(lambda: rp.state.dra_binds >= 1)
    async with channel(rp.config.dra_registration_socket) as ch:
        stub = reg_grpc.RegistrationStub(ch)
        info = await stub.GetInfo(reg_pb.InfoRequest())
        await stub.NotifyRegistrationStatus(reg_pb.RegistrationStatus(plugin_registered=True))
    return info


def published(slices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for s in slices for d in s["spec"]["devices"]}


async def test_dra_end_to_end_through_the_fakes(short_dir: Path) -> None:
    async with FakeApi(NODE) as api, running(short_dir, **dra_options(short_dir, api)) as rp:
        info = await register(rp)
        assert info.type == "DRAPlugin"
        assert info.name == DRIVER
        assert info.endpoint == str(short_dir / "plugins" / DRIVER / "dra.sock")
        assert {"v1.DRAPlugin", "v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth"} <= set(
            info.supported_versions
        )
        await rp.ready.wait()  # the device plugin and the DRA driver are both registered
        assert rp.state.readiness() is None
        table = statuscli.table(rp.state.snapshot()).splitlines()
        row = next(r for r in table if "DRA" in r)
        assert row.split()[:4] == ["DRA", "driver", DRIVER, "yes"]
        apis = {r.split()[0]: r.split()[1] for r in table if r.startswith("GPU-")}
        assert apis[uuid(4)] == "dra"
        assert apis[uuid(0)] == "plugin"

        # one GPU, one API: the device plugin lists GPUs 0-3, DRA publishes 4-7
        await next_update(rp.k, lambda u: bool(u.devices))
        assert {d.id for d in rp.k.devices("nvidia.com/gpu")} == {uuid(i) for i in range(4)}
        await api.wait_slices(lambda s: len(published(s)) == 4)
        (sl,) = api.slices.values()
        assert sl["spec"]["pool"]["name"] == NODE
        assert sl["spec"]["nodeName"] == NODE
        first_generation = sl["spec"]["pool"]["generation"]
        gpu4 = published([sl])["gpu-4"]
        assert gpu4["attributes"]["uuid"] == {"string": uuid(4)}
        assert gpu4["attributes"]["productName"] == {"string": "NVIDIA H100 80GB HBM3"}
        assert gpu4["attributes"]["architecture"] == {"string": "Hopper"}
        assert gpu4["attributes"]["cudaComputeCapability"] == {"version": "9.0.0"}
        assert gpu4["attributes"]["driverVersion"] == {"version": "580.95.5"}
        assert gpu4["attributes"]["numaNode"] == {"int": 1}
        assert gpu4["attributes"]["nvlinkIsland"] == {"int": 0}
        assert gpu4["capacity"] == {"memory": {"value": "81559Mi"}}

        # prepare: devices, CDI IDs, a spec on disk, a checkpoint; again: the same answer
        await api.put_claim(claim("uid-a", [(NODE, "gpu-4"), (NODE, "gpu-5")]))
        async with channel(rp.config.dra_socket) as ch:
            stub = dra_grpc.DRAPluginStub(ch)
            req = dra_pb.NodePrepareResourcesRequest(claims=[ref("uid-a")])
            answer = await stub.NodePrepareResources(req)
            got = answer.claims["uid-a"]
            assert got.error == ""
            assert [(d.device_name, list(d.cdi_device_ids)) for d in got.devices] == [
                ("gpu-4", [f"k8s.{DRIVER}/claim=uid-a-gpu-4"]),
                ("gpu-5", [f"k8s.{DRIVER}/claim=uid-a-gpu-5"]),
            ]
            assert (await stub.NodePrepareResources(req)) == answer
            beta = beta_grpc.DRAPluginStub(ch)
            old = await beta.NodePrepareResources(
                beta_pb.NodePrepareResourcesRequest(claims=[ref("uid-a", beta_pb)])
            )
            assert old.SerializeToString() == answer.SerializeToString()
        spec = json.loads((short_dir / "cdi" / "aiodp-claim_uid-a.json").read_text())
        assert spec["kind"] == f"k8s.{DRIVER}/claim"
        assert f"NVIDIA_VISIBLE_DEVICES={uuid(4)},{uuid(5)}" in spec["containerEdits"]["env"]
        assert [d["name"] for d in spec["devices"]] == ["uid-a-gpu-4", "uid-a-gpu-5"]
        assert spec["devices"][0]["containerEdits"]["deviceNodes"][0]["path"] == "/dev/nvidia4"
        assert "uid-a" in json.loads(rp.config.dra_checkpoint.read_text())["claims"]

        # health: a fault on GPU 5 reaches the health stream and becomes a taint
        async with channel(rp.config.dra_socket) as ch:
            health = health_grpc.DRAResourceHealthStub(ch)
            stream = health.NodeWatchResources(health_pb.NodeWatchResourcesRequest())
            first = await stream.read()
            assert {
                (d.device.pool_name, d.device.device_name, d.health) for d in first.devices
            } == {(NODE, f"gpu-{i}", health_pb.HEALTHY) for i in range(4, 8)}
            write_atomically(rp.devices_file, h100_node(unhealthy={5: "XID 79 (fell off the bus)"}))
            update = await stream.read()
            sick = {
                d.device.device_name: d for d in update.devices if d.health != health_pb.HEALTHY
            }
            assert list(sick) == ["gpu-5"]
            assert sick["gpu-5"].health == health_pb.UNHEALTHY
            assert sick["gpu-5"].last_updated_time > 0
            stream.cancel()
        await api.wait_slices(lambda s: "taints" in published(s).get("gpu-5", {}))
        (sl,) = api.slices.values()
        assert sl["spec"]["pool"]["generation"] > first_generation
        assert published([sl])["gpu-5"]["taints"][0]["effect"] == "NoSchedule"

        # bad claims: each is its own error, never the call's
        await api.put_claim(claim("uid-sick", [(NODE, "gpu-5")]))
        await api.put_claim(claim("uid-foreign", [("other-node", "gpu-0")]))
        await api.put_claim(claim("uid-unknown", [(NODE, "gpu-0")]))  # the device plugin's
        bad_config = [{"opaque": {"driver": DRIVER, "parameters": {"kind": "Nope"}}}]
        await api.put_claim(claim("uid-config", [(NODE, "gpu-6")], bad_config))
        mps = [{"opaque": {"driver": DRIVER, "parameters": {
            "apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig",
            "sharing": {"strategy": "MPS"}}}}]  # fmt: skip
        await api.put_claim(claim("uid-mps", [(NODE, "gpu-6")], mps))
        sliced = [{"opaque": {"driver": DRIVER, "parameters": {
            "apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig",
            "sharing": {"strategy": "TimeSlicing"}}}}]  # fmt: skip
        await api.put_claim(claim("uid-sliced", [(NODE, "gpu-7")], sliced))
        uids = ["uid-sick", "uid-foreign", "uid-unknown", "uid-config", "uid-mps", "uid-missing",
                "uid-sliced"]  # fmt: skip
        answer = await prepare(rp, *uids)
        errors = {u: answer.claims[u].error for u in uids}
        assert "gpu-5" in errors["uid-sick"]
        assert "XID 79" in errors["uid-sick"]
        assert "not in this node's pool" in errors["uid-foreign"]
        assert "gpu-0" in errors["uid-unknown"]
        assert "not published" in errors["uid-unknown"]
        assert "GpuConfig" in errors["uid-config"]
        assert "MPS" in errors["uid-mps"]
        assert "cannot read ResourceClaim default/claim-uid-missing" in errors["uid-missing"]
        assert errors["uid-sliced"] == ""

        # the kubelet deletes this node's slices when it starts: they come back
        await api.delete_slices()
        await api.wait_slices(lambda s: len(published(s)) == 4)

        # unprepare: the spec goes; an unknown claim is fine
        done = await unprepare(rp, "uid-a", "uid-never")
        assert {u: r.error for u, r in done.claims.items()} == {"uid-a": "", "uid-never": ""}
        assert not (short_dir / "cdi" / "aiodp-claim_uid-a.json").exists()
        assert all(
            d.id not in {uuid(i) for i in range(4, GPUS)} for d in rp.k.devices("nvidia.com/gpu")
        )


async def test_dra_unprepare_after_a_restart_uses_the_checkpoint(short_dir: Path) -> None:
    async with FakeApi(NODE) as api:
        await api.put_claim(claim("uid-r", [(NODE, "gpu-7")]))
        options = dra_options(short_dir, api)
        async with running(short_dir, **options) as rp:
            await register(rp)
            assert (await prepare(rp, "uid-r")).claims["uid-r"].error == ""
        spec = short_dir / "cdi" / "aiodp-claim_uid-r.json"
        assert spec.exists()
        async with running(short_dir, **options) as rp:
            await register(rp)
            assert (await unprepare(rp, "uid-r")).claims["uid-r"].error == ""
        assert not spec.exists()


async def test_dra_survives_an_api_server_that_is_down_then_back(short_dir: Path) -> None:
    async with FakeApi(NODE) as api:
        api.down = True
        await api.put_claim(claim("uid-d", [(NODE, "gpu-4")]))
        async with running(short_dir, **dra_options(short_dir, api)) as rp:
            await register(rp)
            await rp.ready.wait()  # the node serves without the API
            answer = await prepare(rp, "uid-d")
            assert "cannot read ResourceClaim" in answer.claims["uid-d"].error
            api.down = False  # back: publishing resumes, the same prepare now works
            await api.wait_slices(lambda s: len(published(s)) == 4)
            assert (await prepare(rp, "uid-d")).claims["uid-d"].error == ""


async def test_dra_falls_back_to_v1beta1_slices(short_dir: Path) -> None:
    async with FakeApi(NODE) as api:
        api.resource_versions = ("v1beta1",)
        async with running(short_dir, **dra_options(short_dir, api)) as rp:
            await register(rp)
            await api.wait_slices(lambda s: len(s) == 1)
            (sl,) = api.slices.values()
            assert sl["apiVersion"] == "resource.k8s.io/v1beta1"
            names = [d["name"] for d in sl["spec"]["devices"]]
            assert names == ["gpu-4", "gpu-5", "gpu-6", "gpu-7"]
            assert sl["spec"]["devices"][0]["basic"]["attributes"]["uuid"] == {"string": uuid(4)}


async def test_dra_sockets_come_back_when_deleted(short_dir: Path) -> None:
    async with FakeApi(NODE) as api, running(short_dir, **dra_options(short_dir, api)) as rp:
        await rp.state.wait_for(lambda: rp.state.dra_binds >= 1)
        assert f"DRA driver {DRIVER}: not registered" in (rp.state.readiness() or "")
        async with channel(rp.config.dra_registration_socket) as ch:  # the kubelet refuses
            await reg_grpc.RegistrationStub(ch).NotifyRegistrationStatus(
                reg_pb.RegistrationStatus(plugin_registered=False, error="version mismatch")
            )
        assert "version mismatch" in (rp.state.readiness() or "")
        await register(rp)
        rp.config.dra_registration_socket.unlink()
        await rp.state.wait_for(lambda: rp.state.dra_binds >= 2)
        info = await register(rp)
        assert info.name == DRIVER


async def test_dra_split_follows_a_config_reload(short_dir: Path) -> None:
    conf = short_dir / "config.yaml"
    conf.write_text("version: v1\ndra:\n  devices: ['7']\n")
    async with FakeApi(NODE) as api:
        options = dra_options(short_dir, api, config_file=conf)
        del options["dra_devices"]  # a flag would win over the file: the file decides here
        async with running(short_dir, **options) as rp:
            await _follow_reload(rp, api, conf)


async def _follow_reload(rp: Running, api: FakeApi, conf: Path) -> None:
    """dra.devices ['7'] -> ['6', '7']: GPU 6 leaves the device plugin and joins the pool."""
    await register(rp)
    await api.wait_slices(lambda s: set(published(s)) == {"gpu-7"})
    await next_update(rp.k, lambda u: len(u.devices) == 7)
    write_atomically(conf, "version: v1\ndra:\n  devices: ['6', '7']\n")
    left = await next_update(
        rp.k, lambda u: u.resource == "nvidia.com/gpu" and uuid(6) not in {d.id for d in u.devices}
    )
    await api.wait_slices(lambda s: set(published(s)) == {"gpu-6", "gpu-7"})
    assert len(rp.k.devices("nvidia.com/gpu")) == 6
    joined = next(
        t for (kind, obj), t in zip(api.slice_events, api.slice_event_times, strict=True)
        if kind != "DELETED" and "gpu-6" in published([obj])
    )  # fmt: skip
    assert left.at <= joined  # withdrawn from the device plugin before it joined DRA
    # and back: it leaves the pool before the device plugin lists it again
    write_atomically(conf, "version: v1\ndra:\n  devices: ['7']\n")
    back = await next_update(
        rp.k, lambda u: u.resource == "nvidia.com/gpu" and uuid(6) in {d.id for d in u.devices}
    )
    gone = next(
        t for (kind, obj), t in zip(api.slice_events, api.slice_event_times, strict=True)
        if t > joined and kind != "DELETED" and "gpu-6" not in published([obj])
    )  # fmt: skip
    assert gone <= back.at


async def test_dra_keeps_what_happened_while_the_api_server_was_away(short_dir: Path) -> None:
    async with FakeApi(NODE) as api, running(short_dir, **dra_options(short_dir, api)) as rp:
        await register(rp)
        await api.wait_slices(lambda s: len(published(s)) == 4)
        api.down = True  # it goes away; a GPU fails meanwhile (seen on the health stream)
        async with channel(rp.config.dra_socket) as ch:
            health = health_grpc.DRAResourceHealthStub(ch)
            stream = health.NodeWatchResources(health_pb.NodeWatchResourcesRequest())
            await stream.read()
            write_atomically(rp.devices_file, h100_node(unhealthy={6: "XID 48"}))
            update = await stream.read()
            assert any(d.health == health_pb.UNHEALTHY for d in update.devices)
            stream.cancel()
        api.down = False  # back: the fault is published, nothing lost
        await api.wait_slices(lambda s: "taints" in published(s).get("gpu-6", {}))


async def test_dra_refuses_oversized_requests_with_invalid_argument(short_dir: Path) -> None:
    async with FakeApi(NODE) as api, running(short_dir, **dra_options(short_dir, api)) as rp:
        await register(rp)
        async with channel(rp.config.dra_socket) as ch:
            stub = dra_grpc.DRAPluginStub(ch)
            for claims in (
                [ref(f"u{i}") for i in range(257)],
                [ref("x" * 300)],
                [dra_pb.Claim(namespace="default", name="no-uid")],
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.NodePrepareResources(
                        dra_pb.NodePrepareResourcesRequest(claims=claims)
                    )
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert len(err.value.details() or "") < 200
            # the plugin still answers
            done = await stub.NodeUnprepareResources(
                dra_pb.NodeUnprepareResourcesRequest(claims=[ref("u1")])
            )
            assert done.claims["u1"].error == ""


async def test_dra_without_device_taints_on_the_server_says_so_once(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeApi(NODE) as api, running(short_dir, **dra_options(short_dir, api)) as rp:
        api.keep_taints = False  # a server without DRADeviceTaints drops the field
        await register(rp)
        await api.wait_slices(lambda s: len(published(s)) == 4)
        write_atomically(rp.devices_file, h100_node(unhealthy={5: "XID 79"}))
        await rp.state.wait_for(lambda: "drops DeviceTaints" in caplog.text)
        write_atomically(rp.devices_file, h100_node(unhealthy={5: "XID 79", 6: "XID 48"}))
        async with channel(rp.config.dra_socket) as ch:  # health still on the stream
            stream = dra_grpc_health(ch)
            first = await stream.read()
            sick = {d.device.device_name for d in first.devices if d.health == health_pb.UNHEALTHY}
            if sick != {"gpu-5", "gpu-6"}:
                second = await stream.read()
                sick = {
                    d.device.device_name for d in second.devices if d.health != health_pb.HEALTHY
                }
            assert sick == {"gpu-5", "gpu-6"}
            stream.cancel()
    assert caplog.text.count("drops DeviceTaints") == 1


def dra_grpc_health(ch: grpc.aio.Channel) -> Any:
    return health_grpc.DRAResourceHealthStub(ch).NodeWatchResources(
        health_pb.NodeWatchResourcesRequest()
    )


async def test_dra_prepare_is_bounded_in_time_and_in_claims(short_dir: Path) -> None:
    """A claim whose read never answers costs the call its budget, not the kubelet's
    deadline; the claims after it get an error each; past MAX_PREPARED, a claim is refused."""
    from aiodp.dra import prepared as draclaims
    from aiodp.dra.claims import ClaimRef
    from aiodp.gpus import sharing
    from aiodp.gpus.devices import DeviceRegistry

    stalled = asyncio.Event()

    async def read(ref: ClaimRef) -> dict[str, Any]:
        if ref.uid == "slow":
            stalled.set()
            await asyncio.Event().wait()  # an API server that never answers
        return claim(ref.uid, [(NODE, "gpu-0")])

    config = dra_options_config(short_dir)
    plan = sharing.plan(simulated.parse(h100_node()).gpus, config)
    registry = DeviceRegistry(plan.devices)
    live = SimpleNamespace(config=config, control_paths=(), imex_channels=())
    preparer = draclaims.ClaimPreparer(
        lambda: live, registry, sharing.dra_resource(DRIVER), NODE, read
    )
    refs = [ClaimRef("default", f"claim-{u}", u) for u in ("slow", "next")]
    async with asyncio.timeout(5):
        out = await preparer.prepare(refs, budget=0.5)
    assert stalled.is_set()
    assert "ran out" in str(out["slow"])
    assert "ran out first" in str(out["next"])
    preparer.prepared = {f"u{i}": {} for i in range(draclaims.MAX_PREPARED)}
    out = await preparer.prepare([ClaimRef("default", "claim-x", "x")])
    assert "the most it keeps" in str(out["x"])


def dra_options_config(directory: Path) -> Config:
    return cfg.build(
        {"dra": True, "dra_devices": "all", "dra_plugins_dir": directory / "plugins",
         "dra_cdi_dir": directory / "cdi"}, None,
    )  # fmt: skip


async def test_dra_socket_that_cannot_be_made_is_one_line_and_exit_1(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The plugins directory is a file: our driver's directory cannot be made there."""
    (short_dir / "plugins").write_text("not a directory")
    async with FakeApi(NODE) as api, running(
        short_dir, expect_code=1, **dra_options(short_dir, api)
    ) as rp:  # fmt: skip
        await rp.task
    assert "cannot" in caplog.text
    assert str(short_dir / "plugins") in caplog.text
    assert "Traceback" not in caplog.text
    assert "fatal" not in caplog.text


FAKE_SMI = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/nvidia-smi.log"
[ -f "$(dirname "$0")/fail" ] && { echo "Insufficient Permissions"; exit 4; }
exit 0
"""


def fake_smi(directory: Path) -> Path:
    path = directory / "nvidia-smi"
    path.write_text(FAKE_SMI)
    path.chmod(0o755)
    return path


def smi_calls(directory: Path) -> list[str]:
    log = directory / "nvidia-smi.log"
    return log.read_text().splitlines() if log.exists() else []


def long_slice(requests: list[str] | None = None) -> list[dict[str, Any]]:
    entry: dict[str, Any] = {"opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig",
        "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}},
    }}}  # fmt: skip
    if requests:
        entry["requests"] = requests
    return [entry]


async def test_dra_a_time_slice_claim_is_set_and_put_back(short_dir: Path) -> None:
    """NVIDIA's GpuConfig TimeSlicing Long: nvidia-smi sets the GPU's time slice at prepare
    and puts it back to Default at unprepare, also after a restart (the checkpoint keeps it);
    a failing nvidia-smi is this claim's error, and nothing is left written."""
    smi = fake_smi(short_dir)
    async with FakeApi(NODE) as api:
        await api.put_claim(claim("uid-ts", [(NODE, "gpu-6")], long_slice()))
        await api.put_claim(claim("uid-bad", [(NODE, "gpu-7")], long_slice()))
        options = dra_options(short_dir, api, nvidia_smi=str(smi))
        async with running(short_dir, **options) as rp:
            await register(rp)
            assert (await prepare(rp, "uid-ts")).claims["uid-ts"].error == ""
            assert smi_calls(short_dir) == [f"compute-policy -i {uuid(6)} --set-timeslice 3"]
            (short_dir / "fail").write_text("")
            error = (await prepare(rp, "uid-bad")).claims["uid-bad"].error
            assert error.startswith(f"cannot set the time slice of {uuid(7)} to 3: ")
            assert "Insufficient Permissions" in error
            assert not (short_dir / "cdi" / "aiodp-claim_uid-bad.json").exists()
            (short_dir / "fail").unlink()
        async with running(short_dir, **options) as rp:  # a restart between the two
            await register(rp)
            assert (await unprepare(rp, "uid-ts")).claims["uid-ts"].error == ""
        assert smi_calls(short_dir)[-1] == f"compute-policy -i {uuid(6)} --set-timeslice 0"
        assert not (short_dir / "cdi" / "aiodp-claim_uid-ts.json").exists()
