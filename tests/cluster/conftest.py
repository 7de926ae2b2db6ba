"""`make cluster-e2e`'s fixtures: one real cluster for the session (tests/cluster/node.py),
run inside tests/cluster/inside.sh's namespaces, and a figures report."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.node import NODE, Cluster

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not os.environ.get("AIODP_CLUSTER_WORK"):
        raise pytest.UsageError(
            "tests/cluster runs inside the cluster's namespaces: use make cluster-e2e"
        )


def report(line: str) -> None:
    """A figure for `make cluster-e2e` to print at the end (tests assert, never time)."""
    print(f"figure: {line}", flush=True)  # noqa: T201
    path = os.environ.get("AIODP_CLUSTER_REPORT")
    if path:
        with Path(path).open("a") as f:
            f.write(line + "\n")


_CLUSTER: list[Cluster] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On a failure, what an operator would look at: pods, events, the plugin's log."""
    rep = yield
    if rep.failed and _CLUSTER:
        c = _CLUSTER[0]
        for args in (("get", "pods", "-A", "-o", "wide"), ("get", "events", "-A"),
                     ("logs", "-n", "nvidia-device-plugin", "-l", "app.kubernetes.io/instance=gpu",
                      "--tail=40", "--all-containers"),
                     ("get", "node", "-o", "jsonpath={.status}")):  # fmt: skip
            try:
                out = c.kubectl(*args, check=False, timeout=20)
            except Exception as e:  # diagnostics only
                out = repr(e)
            rep.sections.append((f"kubectl {' '.join(args[:3])}", out[-6000:]))
    return rep


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    c = Cluster(Path(os.environ["AIODP_CLUSTER_WORK"]), REPO)
    _CLUSTER.append(c)
    try:
        c.start()
        # what Node Feature Discovery puts on a node with an NVIDIA PCI device (the chart's
        # affinity selects such nodes, as NVIDIA's does)
        c.kubectl("label", "node", NODE, "feature.node.kubernetes.io/pci-10de.present=true")
        for what, took in c.phases:
            report(f"bring-up {what}: {took:.1f} s")
        yield c
    finally:
        c.stop()
