"""DRA against the real Kubernetes code: the kube-scheduler places a pod and allocates its
claim from the ResourceSlices this plugin published, the kubelet's plugin manager and DRA
manager (the Go driver tests/e2e/drakubelet) prepare it through this plugin, all against a
real kube-apiserver with etcd.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.apiserver import ApiServer, Scheduler
from tests.e2e.conftest import report
from tests.e2e.peer import DraKubelet, DriverError, dra_versions
from tests.harness import h100_node, running, write_atomically

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

NODE = "gpu-dra-e2e-1"
DRIVER = "gpu.aiodp.io"
SLICES = f"/apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName%3D{NODE}"


async def slices_until(api: ApiServer, check: Any, within: float = 60) -> list[dict[str, Any]]:
    """Our node's ResourceSlices once `check(items)` holds (polling another process)."""
    async with asyncio.timeout(within):
        while True:
            status, body = await api.call("GET", SLICES)
            assert status == 200, body
            if check(body["items"]):
                return list(body["items"])
            await asyncio.sleep(0.1)  # the API server is another process: poll it


def devices(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for s in items for d in s["spec"]["devices"]}


async def until(api: ApiServer, path: str, check: Any, within: float = 60) -> dict[str, Any]:
    """GET `path` until `check(object)` holds (polling another process); on timeout the
    assertion shows the object and the scheduler's log."""
    body: Any = None
    try:
        async with asyncio.timeout(within):
            while True:
                status, body = await api.call("GET", path)
                if status == 200 and check(body):
                    return dict(body)
                await asyncio.sleep(0.1)  # the API server is another process: poll it
    except TimeoutError:
        log = api.directory / "kube-scheduler.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise AssertionError(f"{path} never passed: {body}\nscheduler:\n{tail}") from None


async def create(api: ApiServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, out = await api.call("POST", path, body)
    assert status == 201, out
    return dict(out)


async def schedulable_node(api: ApiServer) -> None:
    """A Node the scheduler can place a pod on (no kubelet posts its status here)."""
    node = await create(api, "/api/v1/nodes", {
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
    })  # fmt: skip
    room = {"cpu": "8", "memory": "32Gi", "pods": "110"}
    node["status"] = {
        "capacity": room, "allocatable": room,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "the e2e test says so"}],
    }  # fmt: skip
    status, node = await api.call("PUT", f"/api/v1/nodes/{NODE}/status", node)
    assert status == 200, node
    # admission gave the new Node the not-ready taint; no node controller runs to lift it
    node["spec"]["taints"] = []
    status, node = await api.call("PUT", f"/api/v1/nodes/{NODE}", node)
    assert status == 200, node


CLAIM = {
    "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
    "metadata": {"name": "claim-a", "namespace": "default"},
    "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
        "deviceClassName": DRIVER,
        "selectors": [{"cel": {"expression":
            f'device.attributes["{DRIVER}"].productName.startsWith("NVIDIA H100") && '
            f'device.capacity["{DRIVER}"].memory.compareTo(quantity("80G")) >= 0'}}],
    }}]}},
}  # fmt: skip
POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "pod-a", "namespace": "default"},
    "spec": {
        "containers": [{"name": "main", "image": "registry.invalid/none",
                        "resources": {"claims": [{"name": "gpu"}]}}],
        "resourceClaims": [{"name": "gpu", "resourceClaimName": "claim-a"}],
    },
}  # fmt: skip


@pytest.mark.parametrize("version", dra_versions())
async def test_e2e_dra_claim_scheduled_and_prepared_by_the_real_kubernetes(
    short_dir: Path, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    """1.37: dra v1 and the health stream; 1.32: dra v1beta1 (the kubelet reads claims and
    wipes slices through resource.k8s.io/v1beta1, turned on for it), no health stream."""
    old = int(version.split(".")[1]) < 34
    extra = ("--runtime-config=resource.k8s.io/v1beta1=true",) if old else ()
    async with ApiServer(short_dir, *extra) as api, Scheduler(api, short_dir):
        await schedulable_node(api)
        await create(api, "/apis/resource.k8s.io/v1/deviceclasses", {
            "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": DRIVER},
            "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{DRIVER}'"}}]},
        })  # fmt: skip
        kubeconfig = api.kubeconfig(short_dir)
        registry, state = short_dir / "registry", short_dir / "state"
        registry.mkdir()
        state.mkdir()
        async with DraKubelet(version, registry, state, kubeconfig, NODE) as kubelet, running(
            short_dir, node_name=NODE, kubeconfig=kubeconfig, dra=True,
            dra_devices=("4", "5", "6", "7"), dra_registry_dir=registry,
            dra_plugins_dir=short_dir / "plugins", dra_cdi_dir=short_dir / "cdi",
        ) as rp:  # fmt: skip
            # registration through the plugin watcher; version negotiated by the kubelet
            await kubelet.call("wait_registered", driver=DRIVER, timeout=30)
            await rp.state.wait_for(lambda: rp.state.snapshot()["dra"]["registered"])
            items = await slices_until(api, lambda s: len(devices(s)) == 4)
            assert sorted(devices(items)) == ["gpu-4", "gpu-5", "gpu-6", "gpu-7"]
            report(
                f"DRA e2e (kubelet {kubelet.version}): 4 devices published in {len(items)} slice(s)"
            )

            # the kube-scheduler allocates the claim from our slices and binds the pod
            await create(api, "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims", CLAIM)
            pod = await create(api, "/api/v1/namespaces/default/pods", POD)
            pod = await until(api, "/api/v1/namespaces/default/pods/pod-a",
                              lambda p: p["spec"].get("nodeName") == NODE)  # fmt: skip
            claim = await until(
                api,
                "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/claim-a",
                lambda c: (c.get("status") or {}).get("allocation"),
            )
            (result,) = claim["status"]["allocation"]["devices"]["results"]
            assert (result["driver"], result["pool"]) == (DRIVER, NODE)
            device, uid = result["device"], claim["metadata"]["uid"]
            assert device in {"gpu-4", "gpu-5", "gpu-6", "gpu-7"}
            report(
                f"DRA e2e: kube-scheduler allocated {device} to claim-a and bound pod-a to {NODE}"
            )

            # prepared by the kubelet's DRA manager, through our plugin
            pod_uid = pod["metadata"]["uid"]
            prepared = await kubelet.call("prepare", pod="pod-a", uid=pod_uid, claim="claim-a")
            assert prepared["cdi_devices"] == [f"k8s.{DRIVER}/claim={uid}-{device}"]
            spoken = "v1beta1" if old else "v1"  # what the kubelet negotiated from GetInfo
            assert f"over dra {spoken}:" in caplog.text
            spec = json.loads((short_dir / "cdi" / f"aiodp-claim_{uid}.json").read_text())
            assert spec["devices"][0]["name"] == f"{uid}-{device}"
            report(f"DRA e2e: prepare of 1 device through the kubelet took "
                   f"{prepared['took_ns'] / 1e6:.1f} ms; CDI spec {spec['kind']}")  # fmt: skip

            # a GPU fault: on the kubelet's health stream (1.34+) and as a taint on the slice
            index = int(device.removeprefix("gpu-"))
            write_atomically(
                rp.devices_file, h100_node(unhealthy={index: "XID 79 (fell off the bus)"})
            )
            if not old:
                health = await kubelet.call(
                    "health", pod="pod-a", uid=pod_uid, claim="claim-a", want="Unhealthy",
                    timeout=30,
                )  # fmt: skip
                report(f"DRA e2e: the kubelet's resource health of the claim: {health['health']}")
            items = await slices_until(api, lambda s: "taints" in devices(s).get(device, {}))
            assert devices(items)[device]["taints"][0]["effect"] == "NoSchedule"
            write_atomically(rp.devices_file, h100_node())
            items = await slices_until(api, lambda s: "taints" not in devices(s).get(device, {}))
            if not old:
                await kubelet.call(
                    "health", pod="pod-a", uid=pod_uid, claim="claim-a", want="Healthy",
                    timeout=30,
                )  # fmt: skip
                # 40 s with no change: the kubelet's health of the claim must not go stale
                # (Unknown after a device's timeout, 30 s when none is set): we set the
                # timeout and re-send the full list well inside it
                with pytest.raises(DriverError) as stale:
                    await kubelet.call(
                        "health", pod="pod-a", uid=pod_uid, claim="claim-a", want="Unknown",
                        timeout=40,
                    )  # fmt: skip
                assert "timed out" in str(stale.value)
                assert "'Healthy'" in str(stale.value)
                report("DRA e2e: 40 s after the last change the kubelet still reads the "
                       "claim's device Healthy (not Unknown)")  # fmt: skip

            # a kubelet restart: it wipes the node's slices; they come back, the driver is
            # found again without registering, and the prepared claim is still answered
            before = items[0]["metadata"]["uid"]
            restarted = await kubelet.call("restart")
            items = await slices_until(
                api, lambda s: len(devices(s)) == 4 and s[0]["metadata"]["uid"] != before
            )  # wiped by the kubelet, published again by us
            await kubelet.call("wait_registered", driver=DRIVER, timeout=30)
            back = await kubelet.call("prepare", pod="pod-a", uid=pod_uid, claim="claim-a")
            # (a 1.32 kubelet lists the restored claim's CDI device twice: its own cache)
            assert set(back["cdi_devices"]) == set(prepared["cdi_devices"])
            generation = items[0]["spec"]["pool"]["generation"]
            report(f"DRA e2e: kubelet restart at {restarted['started_ns'] / 1e9:.3f}: slices "
                   f"re-published (generation {generation})")  # fmt: skip

            await kubelet.call("unprepare", pod="pod-a", uid=pod_uid, claim="claim-a")
            assert not (short_dir / "cdi" / f"aiodp-claim_{uid}.json").exists()
