"""Run inside the image by `make image-test`: `python -m aiodp serve` (simulated 8 GPUs,
/metrics and the probes served) from exec to the kubelet stand-in's Register done, and its
RSS then, median of 5 starts, on a read-only root (every import must come from the bytecode
built into the image)."""

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiodp.standins.kubelet import FakeKubelet
from aiodp.standins.testbed import free_port, h100_node, rss_mib


async def once() -> tuple[float, float]:
    directory = Path(tempfile.mkdtemp(prefix="aiodp-"))
    node = directory / "devices.yaml"
    node.write_text(h100_node())
    async with FakeKubelet(directory) as kubelet:
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiodp", "serve", "--backend", "simulated",
            "--simulated-devices", str(node), "--kubelet-socket", str(directory / "kubelet.sock"),
            f"--metrics-address=127.0.0.1:{free_port()}", "--pod-resources-socket", "",
            "--log-level", "warning",
        )  # fmt: skip
        async with asyncio.timeout(60):
            await kubelet.registrations.get()
        took = time.perf_counter() - t
        rss = rss_mib(proc.pid)
        proc.terminate()
        await proc.wait()
    return took, rss


async def main() -> None:
    await once()  # the page cache
    runs = [await once() for _ in range(5)]
    starts = [took for took, _ in runs]
    median = statistics.median(starts) * 1e3
    print(f"start-up in the image: exec -> Register done, median {median:.0f} ms "
          f"(min {min(starts) * 1e3:.0f}, max {max(starts) * 1e3:.0f}; 5 starts); RSS after "
          f"start {statistics.median(rss for _, rss in runs):.1f} MiB")  # fmt: skip


asyncio.run(main())
