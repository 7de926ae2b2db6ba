"""dra.compat=nvidia against the real kube-scheduler: NVIDIA's own example claims (the
quickstart specs of kubernetes-sigs/dra-driver-nvidia-gpu, their claim specs written out
here) allocated unchanged from our slices, through the DeviceClasses our chart renders; and a
plain `nvidia.com/gpu: 1` pod served through DRA (KEP-5004, extendedResourceName)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aiodp.gpus.nvml import NvmlBackend
from tests import fakemps
from tests.e2e.apiserver import ApiServer, Scheduler
from tests.e2e.conftest import report
from tests.e2e.peer import DraKubelet, dra_versions
from tests.e2e.test_dra import NODE, create, devices, schedulable_node, slices_until, until
from tests.fakenvml import dgx
from tests.harness import running
from tests.helm.test_chart import kind, render
from tests.integration.test_dra import fake_smi, smi_calls

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

DRIVER = "gpu.nvidia.com"
A100 = "NVIDIA A100-SXM4-40GB"


def node_file() -> str:
    """Eight whole A100s (indexes 0-7) and a ninth in MIG mode with NVIDIA's demo geometry."""
    lines = ["gpus:"]
    for i in range(9):
        lines += [f"  - uuid: GPU-a100-{i}", f"    name: {A100}", f"    index: {i}",
                  "    memory_mib: 40960", '    cuda_compute_capability: "8.0"',
                  '    driver_version: "580.95.05"', '    cuda_driver_version: "13.0"']  # fmt: skip
    lines.append("    mig_devices:")
    for n, (profile, gi) in enumerate((("1g.5gb", 9), ("1g.5gb", 10), ("2g.10gb", 5),
                                       ("3g.20gb", 2))):  # fmt: skip
        lines.append(f"      - {{uuid: MIG-a100-8-{n}, profile: {profile}, gi: {gi}, ci: 0}}")
    return "\n".join(lines) + "\n"


def request(name: str, cls: str = "gpu.nvidia.com", cel: str = "") -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": cls}
    if cel:
        exactly["selectors"] = [{"cel": {"expression": cel}}]
    return {"name": name, "exactly": exactly}


def gpu_config(sharing: dict[str, Any]) -> dict[str, Any]:
    return {"driver": DRIVER, "parameters": {
        "apiVersion": "resource.nvidia.com/v1beta1", "kind": "GpuConfig", "sharing": sharing,
    }}  # fmt: skip


PROFILE = "device.attributes['gpu.nvidia.com'].profile == '{}'"
# name -> (the claim's devices spec, devices it gets): gpu-test1 (each of two pods its own
# single-gpu claim), gpu-test3, gpu-test4 (four MIG devices of one parent), gpu-test5 (a
# time-sliced and an MPS GPU), gpu-test6 (an A100 of an even index, time-sliced)
EXAMPLES: dict[str, tuple[dict[str, Any], int]] = {
    "test1-pod1": ({"requests": [request("gpu")]}, 1),
    "test1-pod2": ({"requests": [request("gpu")]}, 1),
    "test3": ({"requests": [request("gpu")]}, 1),
    "test4": ({
        "requests": [
            request("mig-1g-5gb-0", "mig.nvidia.com", PROFILE.format("1g.5gb")),
            request("mig-1g-5gb-1", "mig.nvidia.com", PROFILE.format("1g.5gb")),
            request("mig-2g-10gb", "mig.nvidia.com", PROFILE.format("2g.10gb")),
            request("mig-3g-20gb", "mig.nvidia.com", PROFILE.format("3g.20gb")),
        ],
        "constraints": [{"requests": [], "matchAttribute": "gpu.nvidia.com/parentUUID"}],
    }, 4),
    "test5": ({
        "requests": [request("ts-gpu"), request("mps-gpu")],
        "config": [
            {"requests": ["ts-gpu"], "opaque": gpu_config(
                {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}})},
            {"requests": ["mps-gpu"], "opaque": gpu_config(
                {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50,
                                                  "defaultPinnedDeviceMemoryLimit": "10Gi"}})},
        ],
    }, 2),
    "test6": ({
        "requests": [request("gpu", cel=(
            "device.attributes['gpu.nvidia.com'].productName.lowerAscii().matches('^.*a100.*$')"
            " && (device.attributes['gpu.nvidia.com'].index == 0 || "
            "device.attributes['gpu.nvidia.com'].index == 2 || "
            "device.attributes['gpu.nvidia.com'].index == 4 || "
            "device.attributes['gpu.nvidia.com'].index == 6)"))],
        "config": [{"requests": ["gpu"], "opaque": gpu_config(
            {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}})}],
    }, 1),
}  # fmt: skip


def pod(name: str, claim: str | None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "ctr", "image": "registry.invalid/none"}
    spec: dict[str, Any] = {"containers": [container]}
    if claim is None:  # KEP-5004: a plain extended-resource request
        container["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    else:
        container["resources"] = {"claims": [{"name": "gpu"}]}
        spec["resourceClaims"] = [{"name": "gpu", "resourceClaimName": claim}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}  # fmt: skip


async def test_e2e_nvidias_example_claims_allocated_from_our_slices(short_dir: Path) -> None:
    async with ApiServer(short_dir) as api, Scheduler(api, short_dir):
        await schedulable_node(api)
        values = {"dra": {"enabled": True, "devices": "all", "compat": "nvidia"}}
        for cls in kind(render(values), "DeviceClass"):  # as our chart installs them
            cls["metadata"].pop("labels", None)
            await create(api, "/apis/resource.k8s.io/v1/deviceclasses", cls)
        kubeconfig = api.kubeconfig(short_dir)
        registry, state = short_dir / "registry", short_dir / "state"
        registry.mkdir()
        state.mkdir()
        version = dra_versions()[0]
        async with DraKubelet(version, registry, state, kubeconfig, NODE) as kubelet, running(
            short_dir, node=node_file(), node_name=NODE, kubeconfig=kubeconfig, dra=True,
            dra_devices="all", dra_driver_name=DRIVER, mig_strategy="mixed",
            dra_registry_dir=registry, dra_plugins_dir=short_dir / "plugins",
            dra_cdi_dir=short_dir / "cdi", nvidia_smi=str(fake_smi(short_dir)),
        ):  # fmt: skip
            await kubelet.call("wait_registered", driver=DRIVER, timeout=30)
            await slices_until(api, lambda s: len(devices(s)) == 12)  # 8 GPUs, 4 MIG devices
            uids: dict[str, str] = {}
            for name, (spec, _) in EXAMPLES.items():
                await create(api, "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims", {
                    "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                    "metadata": {"name": name, "namespace": "default"},
                    "spec": {"devices": spec},
                })  # fmt: skip
                made = await create(
                    api, "/api/v1/namespaces/default/pods", pod(f"pod-{name}", name)
                )
                uids[name] = made["metadata"]["uid"]
            used: set[str] = set()
            for name, (_, count) in EXAMPLES.items():
                claim = await until(
                    api, f"/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/{name}",
                    lambda c: (c.get("status") or {}).get("allocation"),
                )  # fmt: skip
                results = claim["status"]["allocation"]["devices"]["results"]
                assert len(results) == count
                assert {(r["driver"], r["pool"]) for r in results} == {(DRIVER, NODE)}
                got = {r["device"] for r in results}
                assert not got & used  # every claim its own devices
                used |= got
                if name == "test4":
                    assert got == {f"gpu-8-mig-{n}" for n in range(4)}
                if name == "test6":
                    assert got <= {"gpu-0", "gpu-2", "gpu-4", "gpu-6"}
            report(
                f"DRA e2e (compat nvidia): NVIDIA's example claims {', '.join(EXAMPLES)} "
                f"allocated by the kube-scheduler from our slices ({len(used)} devices)"
            )

            # gpu-test6's claim (TimeSlicing Long) prepared and unprepared through the kubelet
            await kubelet.call("prepare", pod="pod-test6", uid=uids["test6"], claim="test6")
            calls = smi_calls(short_dir)
            assert len(calls) == 1
            assert calls[0].startswith("compute-policy -i GPU-a100-")
            assert calls[0].endswith("--set-timeslice 3")
            await kubelet.call("unprepare", pod="pod-test6", uid=uids["test6"], claim="test6")
            assert smi_calls(short_dir)[-1].endswith("--set-timeslice 0")
            report(
                "DRA e2e (compat nvidia): gpu-test6's TimeSlicing Long claim prepared "
                "(time slice 3) and unprepared (back to 0) by the v1.37.2 DRA manager"
            )

            # KEP-5004: a pod asking nvidia.com/gpu, and no claim, is served through DRA
            created = await create(api, "/api/v1/namespaces/default/pods", pod("plain", None))
            bound = await until(api, "/api/v1/namespaces/default/pods/plain", lambda p: (
                p["spec"].get("nodeName") == NODE
                and (p.get("status") or {}).get("extendedResourceClaimStatus")
            ))  # fmt: skip
            claim_name = bound["status"]["extendedResourceClaimStatus"]["resourceClaimName"]
            prepared = await kubelet.call(
                "prepare", pod="plain", uid=created["metadata"]["uid"], claim=claim_name
            )
            assert prepared["cdi_devices"]
            report(
                f"DRA e2e (compat nvidia): a plain nvidia.com/gpu: 1 pod got claim "
                f"{claim_name}, prepared through our plugin: {prepared['cdi_devices']}"
            )


@pytest.mark.parametrize("version", dra_versions())
async def test_e2e_an_mps_claim_prepared_and_unprepared_by_the_dra_manager(
    short_dir: Path, version: str
) -> None:
    """gpu-test5's MPS request (thread percentage 50, 10Gi pinned) on the fake NVML with a
    fake control binary: allocated by the kube-scheduler, prepared by the DRA manager (1.37:
    dra v1; 1.32: dra v1beta1) with its own daemon, unprepared (the daemon quits)."""
    machine = dgx(2)
    root = short_dir / "mps"
    root.mkdir()
    old = int(version.split(".")[1]) < 34
    extra = ("--runtime-config=resource.k8s.io/v1beta1=true",) if old else ()
    async with ApiServer(short_dir, *extra) as api, Scheduler(api, short_dir):
        await schedulable_node(api)
        for cls in kind(render({"dra": {"enabled": True, "devices": "all", "compat": "nvidia"}}),
                        "DeviceClass"):  # fmt: skip
            cls["metadata"].pop("labels", None)
            await create(api, "/apis/resource.k8s.io/v1/deviceclasses", cls)
        kubeconfig = api.kubeconfig(short_dir)
        registry, state = short_dir / "registry", short_dir / "state"
        registry.mkdir()
        state.mkdir()
        test5, _ = EXAMPLES["test5"]  # a time-sliced GPU (Long) and an MPS one
        claims_path = "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims"

        def backend(c: Any) -> NvmlBackend:
            return NvmlBackend(sys_root=c.sys_root, proc_root=c.proc_root, nvml=machine.module())

        try:
            async with (
                DraKubelet(version, registry, state, kubeconfig, NODE) as kubelet,
                running(
                    short_dir, node_name=NODE, kubeconfig=kubeconfig, dra=True,
                    dra_devices="all", dra_driver_name=DRIVER, dra_registry_dir=registry,
                    dra_plugins_dir=short_dir / "plugins", dra_cdi_dir=short_dir / "cdi",
                    backend="nvml", mps_root=root, mps_mount_shm=False,
                    mps_control=str(fakemps.install(short_dir)), make_backend=backend,
                    nvidia_smi=str(fake_smi(short_dir)),
                ),
            ):  # fmt: skip
                await kubelet.call("wait_registered", driver=DRIVER, timeout=30)
                await slices_until(api, lambda s: len(devices(s)) == 2)
                await create(api, claims_path, {
                    "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                    "metadata": {"name": "mps", "namespace": "default"},
                    "spec": {"devices": test5},
                })  # fmt: skip
                made = await create(api, "/api/v1/namespaces/default/pods", pod("p", "mps"))
                await until(api, f"{claims_path}/mps",
                            lambda c: (c.get("status") or {}).get("allocation"))  # fmt: skip
                uid = made["metadata"]["uid"]
                prepared = await kubelet.call("prepare", pod="p", uid=uid, claim="mps")
                assert prepared["cdi_devices"]
                claims = list(root.glob("claim-*"))
                assert len(claims) == 1
                said = fakemps.commands(root, claims[0].name)
                assert "set_default_active_thread_percentage 50" in said
                assert any(c.endswith(" 10240M") for c in said)
                assert [c.split()[-1] for c in smi_calls(short_dir)] == ["3"]  # ts-gpu: Long
                await kubelet.call("unprepare", pod="p", uid=uid, claim="mps")
                assert fakemps.commands(root, claims[0].name)[-1] == "quit"
                assert [c.split()[-1] for c in smi_calls(short_dir)] == ["3", "0"]
            report(
                "DRA e2e (compat nvidia): gpu-test5's claim (a Long time slice and an MPS GPU "
                f"with its own daemon, 50 %, 10240M) prepared and unprepared by the {version} "
                "DRA manager"
            )
        finally:
            fakemps.kill_all(root)
