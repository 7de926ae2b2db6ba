"""Every YAML and command example in the README, run: a documented example that fails is a bug.

(`make run` and `make test`, the README's first two commands, are what CI runs.)
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from aiodp.config import configfile
from aiodp.config import resolve as config
from aiodp.config.model import Config
from aiodp.dra import slices
from aiodp.gpus import sharing, simulated, topology
from aiodp.kit import metrics
from aiodp.ops import nodesignals
from aiodp.standins import testbed

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def chart_schema() -> jsonschema.Draft7Validator:
    schema = json.loads((ROOT / "charts/nvidia-gpu/values.schema.json").read_text())
    return jsonschema.Draft7Validator(schema)


def yaml_blocks() -> list[str]:
    return [body for lang, body in BLOCKS if lang == "yaml"]


def commands() -> list[str]:
    lines = []
    for lang, body in BLOCKS:
        if lang == "sh":
            lines += body.replace("\\\n", " ").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.strip()]


def test_readme_has_examples() -> None:
    assert len(yaml_blocks()) >= 7
    assert any(c.startswith("helm install") for c in commands())


@pytest.mark.parametrize("body", yaml_blocks(), ids=lambda b: b.split("\n", 1)[0])
def test_readme_yaml_example_is_valid(body: str) -> None:
    doc: Any = yaml.safe_load(body)
    if "gpus" in doc:  # a simulated-devices file
        assert simulated.parse(body).gpus
    elif doc.get("version") == "v1":  # NVIDIA's config file: parsed and built as at start
        config.build({}, configfile.parse(body))
    elif "groups" in doc:  # Prometheus alert rules: every aiodp metric they name exists
        exported = {m.name for m in metrics.REGISTRY.collect()}
        named = set(re.findall(r"\b(aiodp_[a-z_]+)", body))
        assert named
        assert {re.sub(r"_total$", "", n) for n in named} <= exported
    elif doc.get("apiVersion", "").startswith("resource.k8s.io/"):  # a DRA claim example
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
        node = simulated.parse(testbed.h100_node())
        conf = config.build({"dra": True, "dra_devices": "all"}, None)
        plan = sharing.plan(node.gpus, conf)
        topo = topology.build([(g.uuid, g.index, g.numa_node) for g in node.gpus],
                              nvlinks=node.nvlinks)  # fmt: skip
        pool = slices.pool("n", conf.dra_driver_name, plan.dra_devices(),
                           {g.uuid: g for g in node.gpus}, topo)  # fmt: skip
        published = {k for d in pool.devices for k in (*d["attributes"], *d.get("capacity", {}))}
        named = set(re.findall(r'(?:attributes|capacity)\["gpu\.aiodp\.io"\]\.(\w+)', body))
        named |= set(re.findall(r"matchAttribute: gpu\.aiodp\.io/(\w+)", body))
        assert named
        assert named <= published  # every attribute the example names is one we publish
    else:  # Helm values: the chart's schema takes them
        chart_schema().validate(doc)


@pytest.mark.parametrize("line", commands())
def test_readme_command_example_parses(line: str) -> None:
    argv = shlex.split(line)
    if argv[:3] == ["python", "-m", "aiodp"]:
        assert config.resolve(argv[3:], {}).command == argv[3]
    elif argv[:2] == ["helm", "install"]:
        values: dict[str, Any] = {}
        for i, arg in enumerate(argv):
            if arg == "--set":
                key, _, value = argv[i + 1].partition("=")
                node = values
                *parents, last = key.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[last] = yaml.safe_load(value)
        chart_schema().validate(values)
    elif argv[:2] == ["kubectl", "label"]:  # the label aiodp reads, set as its default says
        key = argv[4].partition("=")[0]  # kubectl label node <name> <key>=<value>
        assert key == Config().node_label
    elif argv[:3] == ["kubectl", "get", "nodes"]:  # the condition type aiodp sets
        assert f'@.type=="{nodesignals.CONDITION}"' in line
    elif argv[:3] == ["kubectl", "get", "events"]:  # the Event reason aiodp records
        assert f"reason={nodesignals.XID_EVENT}" in argv[-1]
    else:
        assert argv[0] == "make", line


def test_readme_says_the_node_conditions_polarity_against_gkes() -> None:
    """GKE's condition XidCriticalError is True on a fault; ours, GPUHealthy, is False: the
    README said 'as GKE's plugin does' without the difference."""
    fault = nodesignals.condition([nodesignals.Fault("GPU-0", "0", "XID 79")], "boot")
    assert (nodesignals.CONDITION, fault["status"]) == ("GPUHealthy", "False")
    text = " ".join(README.split())
    assert "GKE's condition is of type `XidCriticalError` and is `True` on a fault" in text
    assert "ours is `GPUHealthy` and is `False` on a fault" in text
