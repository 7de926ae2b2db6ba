"""The Grafana dashboard: generated, its queries name only metrics we export and evaluate in
the renderer's subset, the runbook's metrics all have a panel, the chart ships it, and a render
of a recorded busy node shows data where it should."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from aiodp.kit import metrics
from tests import scripts
from tests.helm.test_chart import kind, render

ROOT = Path(__file__).resolve().parents[2]


dashboard = scripts.load("dashboard")


def exported() -> set[str]:
    """Every sample name aiodp can put on /metrics."""
    names = set()
    for family in metrics.REGISTRY.collect():
        if family.type == "counter" or isinstance(family, CounterMetricFamily):
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram" or isinstance(family, HistogramMetricFamily):
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return names


def queries() -> list[str]:
    doc = json.loads(dashboard.OUT.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def test_dashboard_json_is_generated() -> None:
    assert dashboard.OUT.read_text() == dashboard.text(), "run `make dashboard` and commit it"


@pytest.mark.parametrize("expr", queries())
def test_dashboard_query_names_exported_metrics_and_evaluates(expr: str) -> None:
    names = dashboard.metric_names(expr)
    assert names
    assert set(names) <= exported(), expr
    dashboard.evaluate(expr, [{}, {}], 30.0)  # inside the subset the render understands


def test_dashboard_covers_every_runbook_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    runbook = readme[readme.index("## Runbook") :]
    mentioned = set(re.findall(r"`(aiodp_[a-z_]+)`", runbook))
    used = {n.removesuffix("_bucket") for e in queries() for n in dashboard.metric_names(e)}
    assert mentioned
    assert mentioned - used == set()


def test_dashboard_query_subset_refuses_the_rest() -> None:
    with pytest.raises(ValueError, match="outside the subset"):
        dashboard.evaluate("avg(aiodp_devices)", [{}], 30.0)
    scrapes = [
        {'aiodp_x_total{a="1",instance="n"}': 1.0},
        {'aiodp_x_total{a="1",instance="n"}': 7.0},
    ]
    inc = 'sum by (a) (increase(aiodp_x_total{instance=~"$instance"}[$__rate_interval]))'
    assert dashboard.evaluate(inc, scrapes, 30.0) == {(("a", "1"),): 6.0}


def test_chart_ships_the_dashboard_only_when_asked() -> None:
    assert not [c for c in kind(render({}), "ConfigMap") if "aiodp.json" in c.get("data", {})]
    (cm,) = kind(render({"dashboard": {"enabled": True, "namespace": "monitoring"}}), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["aiodp.json"]) == json.loads(dashboard.OUT.read_text())


@pytest.mark.timeout(60)
async def test_dashboard_render_of_a_busy_node_shows_data() -> None:
    scrapes = await dashboard.record(count=3)
    image: str = dashboard.svg(scrapes)
    titles = {p["title"]: p for p in dashboard.build()["panels"]}

    def panel_text(title: str) -> str:
        start = image.index(f">{title}</text>")
        following = [
            image.index(f">{t}</text>") for t in titles if image.index(f">{t}</text>") > start
        ]
        return image[start : min(following, default=len(image))]

    assert "ml/train-0/trainer: 4" in panel_text("Pods on GPUs")
    assert panel_text("Power").count("<polyline") == 8
    assert "Healthy: 8" in panel_text("Devices by health")
    assert "No data" not in panel_text("GPU utilization")
    assert image.startswith("<svg")
    parsed: Any = __import__("xml.dom.minidom").dom.minidom.parseString(image)
    assert parsed.documentElement.tagName == "svg"
