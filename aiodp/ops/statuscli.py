"""What `aiodp status` shows: the node as the running plugin sees it, asked over its read-only
/status endpoint (never the gRPC socket; nothing is changed), as a table, JSON or YAML."""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

import yaml

from aiodp.config.model import Config

log = logging.getLogger(__name__)


def status_url(metrics_address: str) -> str | None:
    """Where /status is: ":8080" means this host; None when the metrics server is off."""
    if not metrics_address:
        return None
    host, _, port = metrics_address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/status"


def fetch(url: str, timeout: float = 3.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


def run(config: Config, out: TextIO = sys.stdout) -> int:
    """Print the status; 1 with one line when the plugin does not answer."""
    url = status_url(config.metrics_address)
    if url is None:
        print("aiodp status: the metrics server is off (--metrics-address is empty): "  # noqa: T201
              "nothing to ask", file=sys.stderr)  # fmt: skip
        return 1
    try:
        doc = fetch(url)
    except (OSError, urllib.error.URLError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"aiodp status: no aiodp answers at {url} ({reason})", file=sys.stderr)  # noqa: T201
        return 1
    if config.output == "json":
        out.write(json.dumps(doc, indent=2) + "\n")
    elif config.output == "yaml":
        out.write(yaml.safe_dump(doc, sort_keys=False))
    else:
        out.write(table(doc))
    return 0


def _live(m: dict[str, Any]) -> str:
    """UTIL POWER TEMP of a device's GPU, `-` where there is no reading."""
    util, power, temp = (m.get(k) for k in ("utilization_ratio", "power_watts",
                                            "temperature_celsius"))  # fmt: skip
    return (
        f"{'-' if util is None else f'{util * 100:.0f}%':>5} "
        f"{'-' if power is None else f'{power:.0f}W':>6} "
        f"{'-' if temp is None else f'{temp:.0f}C':>5}"
    )


def table(doc: dict[str, Any]) -> str:
    """One screen: the plugin, its resources, every device, the settings not at default."""
    lines = [f"aiodp {doc.get('version')} since {doc.get('started')}: {doc.get('ready')}"]
    k = doc.get("kubelet")
    lines.append(
        "kubelet: none registered with yet"
        if not k
        else f"kubelet: {k.get('socket')} (inode {k.get('inode')}) since {k.get('since')}; "
        f"{k.get('restarts_seen', 0)} restart(s) seen"
    )
    lines.append("")
    lines.append(f"{'RESOURCE':<32} {'REGISTERED':<10} {'SINCE':<26} STREAMS")
    for r in doc.get("resources", []):
        lines.append(
            f"{r['name']:<32} {'yes' if r['registered'] else 'no':<10} "
            f"{r['since'] or '-':<26} {r['streams']}"
        )
    dra = doc.get("dra")
    if dra:
        drivers = f"DRA driver {dra['driver']}"
        lines.append(f"{drivers:<32} {'yes' if dra['registered'] else 'no':<10} "
                     f"{'-':<26} {dra.get('error') or '-'}")  # fmt: skip
    head = (f"{'DEVICE':<44} {'API':<6} {'HEALTH':<10} {'SINCE':<26} {'NUMA':<5} {'NVLINK':<16} "
            f"{'UTIL':>5} {'POWER':>6} {'TEMP':>5} {'REASON':<24} POD")  # fmt: skip
    lines += ["", head]
    for d in doc.get("devices", []):
        peers = ",".join(f"{k}x{v}" for k, v in d["nvlink_peers"].items()) or "-"
        numa = "-" if d["numa"] is None else str(d["numa"])
        api = "dra" if str(d.get("resource", "")).startswith("dra:") else "plugin"
        lines.append(
            f"{d['id']:<44} {api:<6} {d['health']:<10} {d['since'] or '-':<26} {numa:<5} "
            f"{peers:<16} {_live(d.get('metrics') or {})} {d['reason'] or '-':<24} "
            f"{d['pod'] or '-'}"
        )
    claims = doc.get("claims") or []
    if claims:
        lines += ["", f"{'CLAIM':<44} {'DEVICE':<16} POD"]
        lines += [f"{c['claim']:<44} {c['device']:<16} {c['pod']}" for c in claims]
    changed = {k: v for k, v in doc.get("config", {}).items() if v["source"] != "default"}
    lines += ["", "SETTINGS NOT AT DEFAULT"]
    lines += [f"  {k} = {v['value']}  ({v['source']})" for k, v in sorted(changed.items())]
    reloads = doc.get("reloads", {})
    lines += ["", f"config reloads: {reloads.get('count', 0)}, last: {reloads.get('last') or '-'}"]
    return "\n".join(lines) + "\n"
