"""The Grafana dashboard shipped with the chart, and a static render of it.

    python scripts/dashboard.py generate   # writes charts/nvidia-gpu/dashboards/aiodp.json
    python scripts/dashboard.py render     # records a demo node, writes docs/dashboard.svg

The panels are declared here once; `make dashboard` regenerates the JSON (a test fails when
it drifts). Queries keep to a small PromQL subset, `QUERY` below, so that the render can
evaluate every one of them against scrapes of a running plugin without a Prometheus: a
selector, optionally `== 0`, `sum by (...) (...)`, `increase(...[$__rate_interval])` and
`histogram_quantile(q, sum by (le, ...) (rate(...[$__rate_interval])))`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import logging
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "charts" / "nvidia-gpu" / "dashboards" / "aiodp.json"
SVG = ROOT / "docs" / "dashboard.svg"
SEL = '{instance=~"$instance"}'


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries | stat | table
    queries: tuple[str, ...]
    legend: str = ""
    unit: str = "short"
    width: int = 8


def q(metric: str) -> str:
    return f"{metric}{SEL}"


def inc(metric: str, by: str) -> str:
    return f"sum by ({by}) (increase({metric}{SEL}[$__rate_interval]))"


GPU = "GPU {{gpu}} {{pod}}"
PANELS: tuple[Panel, ...] = (
    Panel("Devices by health", "stat", (f"sum by (health) ({q('aiodp_devices')})",),
          "{{health}}"),
    Panel("Unhealthy devices and why", "table", (f"{q('aiodp_device_healthy')} == 0",),
          "{{device}} {{reason}}", width=16),
    Panel("Pods on GPUs", "table", (q("aiodp_pod_devices"),),
          "{{namespace}}/{{pod}}/{{container}}", width=12),
    Panel("Pods on an Unhealthy GPU", "stat", (q("aiodp_pod_unhealthy_devices"),),
          "{{namespace}}/{{pod}}", width=12),
    Panel("GPU utilization", "timeseries", (q("aiodp_gpu_utilization_ratio"),
                                             q("aiodp_gpu_memory_utilization_ratio")),
          GPU, "percentunit"),
    Panel("GPU memory", "timeseries", (q("aiodp_gpu_memory_used_bytes"),
                                        q("aiodp_gpu_memory_total_bytes")), GPU, "bytes"),
    Panel("Power", "timeseries", (q("aiodp_gpu_power_watts"),), GPU, "watt"),
    Panel("Temperature", "timeseries", (q("aiodp_gpu_temperature_celsius"),), GPU, "celsius"),
    Panel("Clocks", "timeseries", (q("aiodp_gpu_sm_clock_hertz"),
                                    q("aiodp_gpu_memory_clock_hertz")), GPU, "hertz"),
    Panel("Energy", "timeseries", (inc("aiodp_gpu_energy_joules_total", "gpu"),), "GPU {{gpu}}",
          "joule"),
    Panel("Clocks held down by", "timeseries",
          (f"sum by (reason) ({q('aiodp_gpu_clock_event_active')})",), "{{reason}}"),
    Panel("XIDs", "timeseries", (inc("aiodp_xid_events_total", "xid, action"),),
          "XID {{xid}} {{action}}"),
    Panel("Health transitions", "timeseries",
          (inc("aiodp_health_transitions_total", "direction, reason"),),
          "{{direction}} {{reason}}"),
    Panel("Memory errors", "timeseries", (
        inc("aiodp_gpu_ecc_errors_total", "gpu, type"),
        inc("aiodp_gpu_remapped_rows_total", "gpu, type"),
        q("aiodp_gpu_retired_pages"),
    ), "GPU {{gpu}} {{type}}"),
    Panel("PCIe and NVLink errors", "timeseries", (
        inc("aiodp_gpu_pcie_replays_total", "gpu"),
        inc("aiodp_gpu_nvlink_errors_total", "gpu, type"),
    ), "GPU {{gpu}} {{type}}"),
    Panel("Registrations and kubelet restarts", "timeseries", (
        inc("aiodp_registrations_total", "resource, result"),
        inc("aiodp_kubelet_restarts_total", "instance"),
    ), "{{resource}} {{result}}"),
    Panel("ListAndWatch", "timeseries", (
        f"sum by (resource) ({q('aiodp_listandwatch_streams')})",
        inc("aiodp_listandwatch_snapshots_total", "resource"),
    ), "{{resource}}"),
    Panel("Allocate latency p99", "timeseries", (
        "histogram_quantile(0.99, sum by (le, method) "
        f"(rate(aiodp_request_duration_seconds_bucket{SEL}[$__rate_interval])))",
    ), "{{method}}", "s"),
    Panel("Requests by status", "timeseries", (inc("aiodp_requests_total", "method, code"),),
          "{{method}} {{code}}"),
    Panel("Config reloads", "timeseries", (inc("aiodp_config_reloads_total", "result"),),
          "{{result}}"),
    Panel("NVML", "timeseries", (
        inc("aiodp_nvml_errors_total", "function"),
        f"sum by (backend) ({q('aiodp_backend_initialized')})",
    ), "{{function}}{{backend}}"),
    Panel("Versions", "table", (q("aiodp_build_info"),), "{{version}} {{python}}", width=24),
)  # fmt: skip


def build() -> dict[str, Any]:
    """The dashboard JSON (Grafana's schema 39), with a Prometheus datasource variable."""
    panels, x, y = [], 0, 0
    for i, p in enumerate(PANELS):
        if x + p.width > 24:
            x, y = 0, y + 8
        panels.append({
            "id": i + 1, "type": p.kind, "title": p.title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"x": x, "y": y, "w": p.width, "h": 8},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "options": {},
            "targets": [
                {"refId": chr(65 + j), "expr": expr, "legendFormat": p.legend,
                 "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 **({"format": "table", "instant": True} if p.kind == "table" else {})}
                for j, expr in enumerate(p.queries)
            ],
        })  # fmt: skip
        x += p.width
    return {
        "title": "aiodp: GPU node",
        "uid": "aiodp-node",
        "schemaVersion": 39,
        "tags": ["aiodp", "gpu"],
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
            {"name": "instance", "type": "query", "label": "node",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": "label_values(aiodp_build_info, instance)",
             "includeAll": True, "multi": True, "refresh": 2},
        ]},
        "panels": panels,
    }  # fmt: skip


def text() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


# -- the query subset, and its evaluation over recorded scrapes ----------------------------

Series = dict[tuple[tuple[str, str], ...], float]
"""labels (sorted pairs) -> value"""

_SELECTOR = re.compile(r'^(?P<name>[a-z_:][a-z0-9_:]*)\{instance=~"\$instance"\}(?P<rest>.*)$')
_SUM = re.compile(r"^sum by \((?P<by>[a-z_, ]+)\) \((?P<inner>.*)\)$")
_INC = re.compile(r"^(?P<fn>increase|rate)\((?P<sel>.*)\[\$__rate_interval\]\)$")
_HQ = re.compile(r"^histogram_quantile\((?P<q>0\.\d+), (?P<inner>.*)\)$")


def metric_names(expr: str) -> list[str]:
    """The sample names a query reads (its selectors)."""
    return re.findall(r"([a-z_:][a-z0-9_:]*)\{", expr)


def evaluate(expr: str, scrapes: Sequence[dict[str, float]], step: float) -> Series:
    """The query's value at the last scrape; ValueError outside the subset."""
    if m := _HQ.match(expr):
        return _quantile(float(m["q"]), evaluate(m["inner"], scrapes, step))
    if m := _SUM.match(expr):
        by = [b.strip() for b in m["by"].split(",")]
        out: Series = {}
        for labels, v in evaluate(m["inner"], scrapes, step).items():
            key = tuple((k, dict(labels).get(k, "")) for k in by)
            out[key] = out.get(key, 0.0) + v
        return out
    if m := _INC.match(expr):
        first, last = _select(m["sel"], scrapes[0]), _select(m["sel"], scrapes[-1])
        window = step * (len(scrapes) - 1) or 1.0
        out = {k: v - first.get(k, 0.0) for k, v in last.items()}
        return out if m["fn"] == "increase" else {k: v / window for k, v in out.items()}
    if m := _SELECTOR.match(expr):
        series = _select(f'{m["name"]}{{instance=~"$instance"}}', scrapes[-1])
        if m["rest"] == " == 0":
            return {k: v for k, v in series.items() if v == 0}
        if m["rest"]:
            raise ValueError(f"outside the subset: {expr}")
        return series
    raise ValueError(f"outside the subset: {expr}")


def _select(selector: str, scrape: dict[str, float]) -> Series:
    m = _SELECTOR.match(selector)
    if m is None or m["rest"]:
        raise ValueError(f"outside the subset: {selector}")
    out: Series = {}
    for key, v in scrape.items():
        name, _, rest = key.partition("{")
        if name != m["name"]:
            continue
        labels = tuple(sorted(re.findall(r'([a-zA-Z_]+)="([^"]*)"', rest)))
        out[labels] = v
    return out


def _quantile(q: float, buckets: Series) -> Series:
    groups: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for labels, v in buckets.items():
        d = dict(labels)
        le = float(d.pop("le"))
        groups.setdefault(tuple(sorted(d.items())), []).append((le, v))
    out: Series = {}
    for key, pts in groups.items():
        pts.sort()
        total = pts[-1][1]
        if total <= 0:
            continue
        target, prev_le, prev_v = q * total, 0.0, 0.0
        for le, v in pts:
            if v >= target:
                span = v - prev_v
                le = prev_le if le == float("inf") else le
                out[key] = prev_le + (le - prev_le) * ((target - prev_v) / span if span else 1)
                break
            prev_le, prev_v = le, v
    return out


def legend(fmt: str, labels: tuple[tuple[str, str], ...]) -> str:
    d = dict(labels)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: d.get(m[1], ""), fmt).strip() or "value"


# -- recording a node, and the SVG --------------------------------------------------------


async def record(count: int = 12) -> list[dict[str, float]]:
    """Scrapes of a simulated 8-GPU node that is busy: values move, a pod holds GPUs, GPU 3
    reports XID 79 and comes back, the kubelet restarts."""
    quiet = logging.getLogger("aiodp")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the node's story is in the scrapes
    try:
        return await _record(count)
    finally:
        quiet.setLevel(level)


async def _record(count: int) -> list[dict[str, float]]:
    from aiodp.kit import metrics
    from aiodp.standins.testbed import (
        DEMO_METRICS,
        busy_node,
        h100_node,
        http_get,
        next_update,
        write_atomically,
    )  # fmt: skip

    d = Path(tempfile.mkdtemp(prefix="aiodp-dash-"))
    scrapes = []
    async with busy_node(d, device_metrics_interval=0.05, health_recovery_period=0.0) as node:
        k, pods, devices = node.kubelet, node.pods, node.devices_file
        ids = [x.id for x in (await next_update(k, lambda u: bool(u.devices))).devices]
        for step in range(count):
            now = {
                i: {**m, "utilization_ratio": round((0.2 + 0.07 * i + 0.05 * step) % 1, 2),
                    "power_watts": 90 + 40 * i + 15 * ((step + i) % 4),
                    "temperature_celsius": 30 + 3 * i + step % 3,
                    "energy_joules": (90 + 40 * i) * 30 * step,
                    "sm_clock_hertz": 1.98e9 - 1e8 * ((step + i) % 3),
                    "clock_events": ["sw_power_cap"] if (step + i) % 5 == 0 else []}
                for i, m in DEMO_METRICS.items()
            }  # fmt: skip
            xid = {3: "XID 79 (simulated)"} if 4 <= step < 8 else {}
            write_atomically(devices, h100_node(xid, metrics=now))
            if step == 2:
                await k.allocate("nvidia.com/gpu", ids[2:6])
                pods.assign("ml", "train-0", "trainer", "nvidia.com/gpu", ids[2:6])
                await k.allocate("nvidia.com/gpu", ids[6:7])
                pods.assign("ml", "infer-1", "server", "nvidia.com/gpu", ids[6:7])
            if step == 9:
                await k.restart()
            await pods.answered()
            scrapes.append(metrics.samples(await http_get(node.address, "/metrics")))
    return scrapes


def svg(scrapes: Sequence[dict[str, float]], step: float = 30.0) -> str:
    """Every panel as a person sees it: lines over the recorded scrapes, stats, tables."""
    unit, pw, ph = 52, 0, 0
    parts = []
    colours = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
               "#fade2a", "#e0b400", "#37872d"]  # fmt: skip
    for panel in build()["panels"]:
        g = panel["gridPos"]
        x0, y0, w, h = g["x"] * unit, g["y"] * 40, g["w"] * unit - 6, 8 * 40 - 6
        pw, ph = max(pw, x0 + w), max(ph, y0 + h)
        parts.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" rx="3" fill="#181b1f" '
                     'stroke="#2c3235"/>')  # fmt: skip
        parts.append(f'<text x="{x0 + 8}" y="{y0 + 18}" fill="#ccccdc" font-size="13" '
                     f'font-weight="bold">{html.escape(panel["title"])}</text>')  # fmt: skip
        lines: list[tuple[str, list[float]]] = []
        for t in panel["targets"]:
            per = [evaluate(t["expr"], scrapes[: i + 1], step) for i in range(len(scrapes))]
            for labels in sorted(per[-1]):
                lines.append((legend(t["legendFormat"], labels), [s.get(labels, 0) for s in per]))
        if not lines:
            parts.append(f'<text x="{x0 + w / 2}" y="{y0 + h / 2}" fill="#8e8e8e" '
                         'text-anchor="middle" font-size="14">No data</text>')  # fmt: skip
        elif panel["type"] == "timeseries":
            top = max(max(v) for _, v in lines) or 1.0
            px, py, cw, chh = x0 + 10, y0 + 30, w - 150, h - 50
            for n, (name, vals) in enumerate(lines[:10]):
                pts = " ".join(
                    f"{px + cw * i / max(len(vals) - 1, 1):.1f},{py + chh * (1 - v / top):.1f}"
                    for i, v in enumerate(vals)
                )
                c = colours[n % len(colours)]
                parts.append(f'<polyline points="{pts}" fill="none" stroke="{c}" '
                             'stroke-width="1.5"/>')  # fmt: skip
                parts.append(f'<text x="{px + cw + 8}" y="{py + 10 + 13 * n}" fill="{c}" '
                             f'font-size="10">{html.escape(name[:22])}</text>')  # fmt: skip
            parts.append(f'<text x="{px}" y="{py + chh + 14}" fill="#8e8e8e" font-size="10">'
                         f'max {_fmt(top, panel)}</text>')  # fmt: skip
        else:
            for n, (name, vals) in enumerate(lines[:12]):
                big = panel["type"] == "stat"
                size, yy = (16, y0 + 48 + 24 * n) if big else (12, y0 + 40 + 17 * n)
                label = f"{html.escape(name[:70])}: {_fmt(vals[-1], panel)}"
                parts.append(f'<text x="{x0 + 12}" y="{yy}" fill="#ccccdc" '
                             f'font-size="{size}">{label}</text>')  # fmt: skip
    body = "\n".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{pw}" height="{ph}" '
            f'font-family="sans-serif"><rect width="100%" height="100%" fill="#111217"/>'
            f"\n{body}\n</svg>\n")  # fmt: skip


def _fmt(v: float, panel: dict[str, Any]) -> str:
    unit = panel["fieldConfig"]["defaults"]["unit"]
    if unit == "bytes":
        return f"{v / 2**30:.1f} GiB"
    if unit == "percentunit":
        return f"{v * 100:.0f}%"
    if unit == "hertz":
        return f"{v / 1e9:.2f} GHz"
    return f"{v:g}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["generate"]:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text())
        print(f"wrote {OUT.relative_to(ROOT)}")
        return 0
    if argv[:1] == ["render"]:
        SVG.parent.mkdir(parents=True, exist_ok=True)
        SVG.write_text(svg(asyncio.run(record())))
        print(f"wrote {SVG.relative_to(ROOT)}")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
