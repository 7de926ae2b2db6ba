"""The patches in `patches/` that would make aiodp cheaper, measured here.

aiodp never runs patched dependencies. For a measurement, each patch is applied with
`git apply` to a copy of its installed package in a temporary directory; the measured
process gets that directory first on PYTHONPATH, and the same measurement runs without it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
PATCHES: Final = ROOT / "patches"

SPEED: Final = (
    "betterproto2-static-version.patch",
    "betterproto2-plain-field-defaults.patch",
    "h2-lazy-frame-repr.patch",
    "hpack-reuse-unchanged-header-blocks.patch",
)
"""The patches that make a start or a call cheaper (the others in patches/ bound memory)."""


def _target(patch: Path) -> tuple[str, int]:
    """(the package a patch changes, the path components `git apply -p` strips to reach it)."""
    for line in patch.read_text().splitlines():
        if line.startswith("+++ b/"):
            parts = line[4:].split("/")
            at = parts.index("src") + 1
            return parts[at], at
    raise ValueError(f"{patch.name}: no '+++ b/' line")


def patched_tree(names: tuple[str, ...] = SPEED) -> Path:
    """A directory holding a copy of each package that `names` change, patched."""
    tree = Path(tempfile.mkdtemp(prefix="aiodp-patched-"))
    for name in names:
        patch = PATCHES / name
        package, strip = _target(patch)
        if not (tree / package).exists():
            spec = __import__(package).__file__
            assert spec is not None
            shutil.copytree(Path(spec).parent, tree / package, ignore=_no_bytecode)
        subprocess.run(
            ["git", "apply", f"-p{strip}", str(patch)], cwd=tree, check=True, capture_output=True
        )
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True)
    return tree  # with bytecode, as pip leaves an installed package


def _no_bytecode(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__"]


STAND_INS: Final = ("http.server", "socketserver", "urllib.request", "wsgiref.simple_server")
"""What prometheus-client's exposition.py imports for its own HTTP server and push gateway,
which aiodp never uses (patches/README.md: the change described, not written)."""

SITECUSTOMIZE: Final = f"""# aiodp bench experiment: prometheus-client without its HTTP machinery
import sys, types

class StandIn(types.ModuleType):  # any class prometheus_client asks for: an empty one
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        made = type(name, (), {{}})
        setattr(self, name, made)
        return made

for name in {STAND_INS!r}:
    sys.modules[name] = StandIn(name)
"""


def without_http_machinery(tree: Path) -> Path:
    """`tree` plus a sitecustomize that puts empty stand-ins for STAND_INS in sys.modules:
    what aiodp would load if prometheus-client imported them only for its own server."""
    (tree / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return tree


def env_with(tree: Path | None) -> dict[str, str]:
    """The environment of a measured process: the patched packages first, or as installed."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return env


IMPORT: Final = """
import sys, time
t = time.perf_counter()
import asyncio, uvloop, betterproto2, aiodp.gen.deviceplugin.v1beta1
took = time.perf_counter() - t
rss = next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]
print(took * 1e3, int(rss) / 1024, "importlib.metadata" in sys.modules, betterproto2.__file__)
"""

ENCODE: Final = """
import time
from aiodp.gen.deviceplugin.v1beta1 import AllocateResponse, ContainerAllocateResponse, DeviceSpec
message = AllocateResponse(container_responses=[ContainerAllocateResponse(
    envs={"NVIDIA_VISIBLE_DEVICES": "GPU-00000000-aiod-4d3e-8f00-00005eed0000"},
    devices=[DeviceSpec(container_path="/dev/nvidia0", host_path="/dev/nvidia0",
                        permissions="rw")])])
best = float("inf")
for _ in range(7):
    t = time.perf_counter()
    for _ in range(2000):
        bytes(message)
    best = min(best, (time.perf_counter() - t) / 2000)
print(best * 1e6)
"""


HEADERS: Final = """
import time, hpack
encoder = hpack.Encoder()
answer = [(b":status", b"200"), (b"content-type", b"application/grpc+proto")]
trailers = [(b"grpc-status", b"0")]
encoder.encode(answer), encoder.encode(trailers)
best = float("inf")
for _ in range(7):
    t = time.perf_counter()
    for _ in range(5000):
        encoder.encode(answer)
        encoder.encode(trailers)
    best = min(best, (time.perf_counter() - t) / 5000)
print(best * 1e6)
"""


def _python(code: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True
    )
    return out.stdout.split()


def bench_import(tree: Path | None, runs: int = 7) -> tuple[float, float, bool]:
    """asyncio, uvloop, betterproto2 and the messages imported in a fresh process: median
    ms, median RSS MiB, whether importlib.metadata got loaded."""
    rows = [_python(IMPORT, env_with(tree)) for _ in range(runs)]
    if tree is not None:  # the patched copy was the one imported
        assert all(r[3].startswith(str(tree)) for r in rows), rows[0]
    return (
        statistics.median(float(r[0]) for r in rows),
        statistics.median(float(r[1]) for r in rows),
        rows[0][2] == "True",
    )


def bench_encode(tree: Path | None) -> float:
    """µs to encode one small AllocateResponse (best of 7 x 2,000)."""
    return float(_python(ENCODE, env_with(tree))[0])


def bench_headers(tree: Path | None) -> float:
    """µs to HPACK-encode a unary answer's header blocks, headers and trailers, on a
    connection that sent them before (best of 7 x 5,000)."""
    return float(_python(HEADERS, env_with(tree))[0])
