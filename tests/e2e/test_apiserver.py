"""Smoke test of the real kube-apiserver and etcd that later e2e tests build on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.apiserver import ApiServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


async def test_e2e_apiserver_node_and_status_patch(short_dir: Path) -> None:
    async with ApiServer(short_dir) as api:
        status, node = await api.call(
            "POST",
            "/api/v1/nodes",
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-1"}},
        )
        assert status == 201, node
        condition = {
            "type": "GPUHealthy",
            "status": "True",
            "reason": "AllGPUsHealthy",
            "message": "aiodp e2e smoke test",
        }
        status, patched = await api.call(
            "PATCH",
            "/api/v1/nodes/gpu-1/status",
            {"status": {"conditions": [condition]}},
            content_type="application/strategic-merge-patch+json",
        )
        assert status == 200, patched
        status, got = await api.call("GET", "/api/v1/nodes/gpu-1")
        assert status == 200
        conditions = {c["type"]: c for c in got["status"]["conditions"]}
        assert conditions["GPUHealthy"]["reason"] == "AllGPUsHealthy"
        status, _ = await api.call("GET", "/api/v1/nodes/nope")
        assert status == 404
