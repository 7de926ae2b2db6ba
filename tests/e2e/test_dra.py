"""DRA against the real Kubernetes code: the kubelet's plugin manager and DRA manager (the
Go driver tests/e2e/drakubelet) and a real kube-apiserver with etcd.

No kube-scheduler runs here: the test writes the claim's allocation and reservation into its
status as the scheduler would (the devices named are ones this plugin published).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.apiserver import ApiServer
from tests.e2e.conftest import report
from tests.e2e.peer import DraKubelet
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


async def allocate(api: ApiServer, name: str, device: str, pod: str, pod_uid: str) -> str:
    """Create a ResourceClaim and write its allocation and reservation as the scheduler
    would; returns its UID."""
    base = "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims"
    status, claim = await api.call("POST", base, {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"devices": {"requests": [
            {"name": "gpu", "exactly": {"deviceClassName": DRIVER}}
        ]}},
    })  # fmt: skip
    assert status == 201, claim
    claim["status"] = {
        "allocation": {
            "devices": {"results": [
                {"request": "gpu", "driver": DRIVER, "pool": NODE, "device": device}
            ]},
            "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": [NODE]}
            ]}]},
        },
        "reservedFor": [{"resource": "pods", "name": pod, "uid": pod_uid}],
    }  # fmt: skip
    status, claim = await api.call("PUT", f"{base}/{name}/status", claim)
    assert status == 200, claim
    return str(claim["metadata"]["uid"])


async def test_e2e_dra_claim_prepared_through_the_kubelets_dra_manager(short_dir: Path) -> None:
    async with ApiServer(short_dir) as api:
        status, node = await api.call(
            "POST",
            "/api/v1/nodes",
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}},
        )
        assert status == 201, node
        kubeconfig = api.kubeconfig(short_dir)
        registry, state = short_dir / "registry", short_dir / "state"
        registry.mkdir()
        state.mkdir()
        async with DraKubelet(registry, state, kubeconfig, NODE) as kubelet, running(
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

            # a claim for a device we published, prepared by the kubelet's DRA manager
            uid = await allocate(api, "claim-a", "gpu-4", "pod-a", "pod-uid-a")
            prepared = await kubelet.call("prepare", pod="pod-a", uid="pod-uid-a", claim="claim-a")
            assert prepared["cdi_devices"] == [f"k8s.{DRIVER}/claim={uid}-gpu-4"]
            spec = json.loads((short_dir / "cdi" / f"aiodp-claim_{uid}.json").read_text())
            assert spec["devices"][0]["name"] == f"{uid}-gpu-4"
            report(f"DRA e2e: prepare of 1 device through the kubelet took "
                   f"{prepared['took_ns'] / 1e6:.1f} ms; CDI spec {spec['kind']}")  # fmt: skip

            # a GPU fault: on the kubelet's health stream and as a taint on the slice
            write_atomically(rp.devices_file, h100_node(unhealthy={4: "XID 79 (fell off the bus)"}))
            health = await kubelet.call(
                "health", pod="pod-a", uid="pod-uid-a", claim="claim-a", want="Unhealthy",
                timeout=30,
            )  # fmt: skip
            report(f"DRA e2e: the kubelet's resource health of the claim: {health['health']}")
            items = await slices_until(api, lambda s: "taints" in devices(s).get("gpu-4", {}))
            assert devices(items)["gpu-4"]["taints"][0]["effect"] == "NoSchedule"
            write_atomically(rp.devices_file, h100_node())
            await kubelet.call(
                "health", pod="pod-a", uid="pod-uid-a", claim="claim-a", want="Healthy",
                timeout=30,
            )  # fmt: skip

            # a kubelet restart: it wipes the node's slices; they come back, the driver is
            # found again without registering, and the prepared claim is still answered
            restarted = await kubelet.call("restart")
            await slices_until(api, lambda s: not s or s[0]["metadata"].get("creationTimestamp"))
            items = await slices_until(api, lambda s: len(devices(s)) == 4)
            await kubelet.call("wait_registered", driver=DRIVER, timeout=30)
            back = await kubelet.call("prepare", pod="pod-a", uid="pod-uid-a", claim="claim-a")
            assert back["cdi_devices"] == prepared["cdi_devices"]
            generation = items[0]["spec"]["pool"]["generation"]
            report(f"DRA e2e: kubelet restart at {restarted['started_ns'] / 1e9:.3f}: slices "
                   f"re-published (generation {generation})")  # fmt: skip

            await kubelet.call("unprepare", pod="pod-a", uid="pod-uid-a", claim="claim-a")
            assert not (short_dir / "cdi" / f"aiodp-claim_{uid}.json").exists()
