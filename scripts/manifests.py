"""Render the chart into plain manifests for installing without Helm: deployments/static/.

`make manifests` writes them; a test fails when they drift from the chart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "nvidia-gpu"
OUT = ROOT / "deployments" / "static" / "nvidia-gpu.yaml"
HEADER = (
    "# aiodp as plain manifests (namespace kube-system, the chart's defaults), for clusters\n"
    "# without Helm. Generated from charts/nvidia-gpu by `make manifests`: do not edit.\n"
)


def render() -> str:
    with helm_python.Chart.load(str(CHART)) as chart:
        files = chart.render(values={}, name="nvidia-gpu", namespace="kube-system")
    docs = [text.strip() for name, text in sorted(files.items()) if name.endswith(".yaml")]
    body = "\n---\n".join(
        d for d in docs if d and any(not x.startswith("#") for x in d.splitlines())
    )
    return HEADER + "---\n" + body + "\n"


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
