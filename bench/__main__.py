"""`make bench`: GetPreferredAllocation and Allocate latency, printed as a table.

Timing targets are read here by people, never asserted in tests.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from aiodp import topology

ROOT = Path(__file__).resolve().parent.parent


def cube_mesh(n: int) -> topology.Topology:
    """DGX-1-like boards of 8: two fully linked quads (1-2 links) joined GPU to GPU."""
    gpus = [(f"GPU-{i:02d}", i, 2 * (i // 8) + (i % 8) // 4) for i in range(n)]
    links: dict[frozenset[str], int] = {}
    for board in range(0, n, 8):
        for quad in (board, board + 4):
            for a in range(4):
                for b in range(a + 1, 4):
                    links[frozenset((gpus[quad + a][0], gpus[quad + b][0]))] = 1 + (a + b) % 2
        for a in range(4):
            links[frozenset((gpus[board + a][0], gpus[board + a + 4][0]))] = 1
    return topology.build(gpus, nvlinks=links)


def all_to_all(n: int) -> topology.Topology:
    """NVSwitch-like: every pair 18 links, two NUMA nodes."""
    gpus = [(f"GPU-{i:02d}", i, i * 2 // n) for i in range(n)]
    names = [g for g, _, _ in gpus]
    links = {frozenset((a, b)): 18 for i, a in enumerate(names) for b in names[i + 1 :]}
    return topology.build(gpus, nvlinks=links)


def stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e3, ordered[int(len(ordered) * 0.99) - 1] * 1e3


def bench_preferred() -> list[tuple[str, int, float, float]]:
    rng = random.Random(7)
    rows = []
    for name, make in (("cube-mesh", cube_mesh), ("all-to-all", all_to_all)):
        for n in (8, 16, 32):
            topo = make(n)
            ids = [f"GPU-{i:02d}" for i in range(n)]
            samples = []
            for _ in range(300):
                available = rng.sample(ids, rng.randint(max(1, n // 2), n))
                size = rng.randint(1, len(available))
                must = rng.sample(available, rng.randint(0, min(2, size)))
                start = time.perf_counter()
                topology.preferred(available, must, size, topo)
                samples.append(time.perf_counter() - start)
            rows.append((name, n, *stats(samples)))
    return rows


def grpcio_stubs() -> tuple[object, object]:
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="aiodp-bench-gen-"))
    protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(ROOT / "protos/deviceplugin/v1beta1/api.proto"),
        ]
    )
    sys.path.insert(0, str(out))
    from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc  # type: ignore[import-not-found]

    return api_pb2, api_pb2_grpc


def start(kind: str, directory: Path) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.server", kind, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "AIODP_LOG_LEVEL": "warning"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "READY":
        raise RuntimeError(f"{kind} server did not start")
    return proc, line[1], line[2]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Scraper(threading.Thread):
    """GET /metrics once a second while `on` is set."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.url = f"http://{address}/metrics"
        self.on = threading.Event()
        self.done = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.done.is_set():
            if not self.on.wait(0.05):
                continue
            with urllib.request.urlopen(self.url, timeout=5) as r:
                r.read()
            self.scrapes += 1
            self.done.wait(1.0)


def bench_allocate(
    rounds: int = 4, calls: int = 500
) -> tuple[dict[str, tuple[float, float]], float, int]:
    import grpc

    api_pb2, api_pb2_grpc = grpcio_stubs()
    directory = Path(tempfile.mkdtemp(prefix="aiodp-bench-"))
    servers = {kind: start(kind, directory) for kind in ("floor", "plugin")}
    samples: dict[str, list[float]] = {kind: [] for kind in (*servers, "plugin+metrics")}
    scraper = Scraper(servers["plugin"][2])
    scraper.start()
    request = api_pb2.AllocateRequest(  # type: ignore[attr-defined]
        container_requests=[
            api_pb2.ContainerAllocateRequest(  # type: ignore[attr-defined]
                devices_ids=["GPU-00000000-aiod-4d3e-8f00-00005eed0000"]
            )
        ]
    )
    try:
        stubs: dict[str, Callable[..., object]] = {}
        channels = []
        for kind, (_, path, _) in servers.items():
            channel = grpc.insecure_channel(f"unix://{path}")
            channels.append(channel)
            stubs[kind] = api_pb2_grpc.DevicePluginStub(channel).Allocate  # type: ignore[attr-defined]
            for _ in range(300):
                stubs[kind](request, timeout=5)
        for _ in range(rounds):
            for kind in ("floor", "plugin", "plugin+metrics"):
                call = stubs[kind.split("+")[0]]
                n = calls
                if kind == "plugin+metrics":
                    scraper.on.set()
                    n = calls * 4  # long enough for several scrapes a round
                for _ in range(n):
                    t = time.perf_counter()
                    call(request, timeout=5)
                    samples[kind].append(time.perf_counter() - t)
                scraper.on.clear()
        for channel in channels:
            channel.close()
        rss = rss_mib(servers["plugin"][0].pid)
    finally:
        scraper.done.set()
        for proc, _, _ in servers.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=15)
    return {kind: stats(s) for kind, s in samples.items()}, rss, scraper.scrapes


def main() -> None:
    print(
        f"aiodp bench on {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )
    print("\nGetPreferredAllocation (topology.preferred; 300 random requests each)")
    print(f"  {'topology':<11} {'GPUs':>4} {'median ms':>10} {'p99 ms':>8}")
    for name, n, med, p99 in bench_preferred():
        print(f"  {name:<11} {n:>4} {med:>10.3f} {p99:>8.3f}")
    print(
        "\nAllocate over a unix socket, grpcio client (4 rounds of 500 calls, 2000 with /metrics "
        "scraped; 300 warm-up)"
    )
    res, rss, scrapes = bench_allocate()
    floor_med = res["floor"][0]
    print(f"  {'server':<36} {'median ms':>10} {'p99 ms':>8} {'x floor':>8}")
    for kind, label in (
        ("floor", "bare grpclib, fixed AllocateResponse"),
        ("plugin", "aiodp plugin (8 simulated GPUs)"),
        ("plugin+metrics", "aiodp plugin, /metrics scraped 1/s"),
    ):
        med, p99 = res[kind]
        print(f"  {label:<36} {med:>10.3f} {p99:>8.3f} {med / floor_med:>8.2f}")
    print(f"  ({scrapes} scrapes of /metrics during the last row; plugin RSS {rss:.1f} MiB)")


if __name__ == "__main__":
    main()
