"""Container images made here, with no registry: a docker-save archive (one layer) that
`ctr images import` loads. The sandbox image is the static pause program; the workload image
is Debian's busybox-static with its applets linked."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

APPLETS = ("sh", "env", "sleep", "cat", "ls", "echo", "grep", "wget", "true", "test", "tr")


def _layer(files: dict[str, Path], links: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(p).parent) for p in [*files, *links]} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, source in sorted(files.items()):
            data = source.read_bytes()
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        for path, target in sorted(links.items()):
            info = tarfile.TarInfo(path)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return out.getvalue()


def archive(
    out: Path, tag: str, files: dict[str, Path], links: dict[str, str], entrypoint: list[str]
) -> Path:
    """Write `tag` as a docker-save archive at `out`."""
    layer = _layer(files, links)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "tests/cluster/images.py"}],
    }).encode()  # fmt: skip
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [tag], "Layers": ["layer/layer.tar"]}]
    ).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in (("layer/layer.tar", layer), (config_name, config),
                           ("manifest.json", manifest)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def pause(cache: Path, out: Path) -> Path:
    return archive(out, "registry.k8s.io/pause:3.10", {"pause": cache / "bin" / "pause"}, {},
                   ["/pause"])  # fmt: skip


def busybox(cache: Path, out: Path) -> Path:
    links = {f"bin/{a}": "busybox" for a in APPLETS}
    files = {"bin/busybox": cache / "debian" / "bin" / "busybox"}
    return archive(out, "docker.io/library/busybox:aiodp-e2e", files, links, ["/bin/sh"])
