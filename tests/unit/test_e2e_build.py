"""tests/e2e/build.sh says what it builds before it builds it (the first build was silent for
minutes), then caches it; run here with a stand-in `go` that builds nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_GO = """#!/bin/sh
case "$1" in
  env) echo "$FAKE_MODCACHE" ;;
  mod) [ "$2" = download ] && mkdir -p "$FAKE_MODCACHE/$3" \\
         && printf 'replace (\\n)\\n' > "$FAKE_MODCACHE/$3/go.mod" ;;
  build) while [ "$1" != -o ]; do shift; done; printf '#!/bin/sh\\n' > "$2"; chmod +x "$2" ;;
esac
exit 0
"""


def build(tmp: Path) -> list[str]:
    env = {
        **os.environ,
        "PATH": f"{tmp / 'bin'}:{os.environ['PATH']}",
        "FAKE_MODCACHE": str(tmp / "mod"),
        "AIODP_E2E_CACHE": str(tmp / "cache"),
        "AIODP_E2E_VERSIONS": "v1.37.2",
        "AIODP_E2E_NO_APISERVER": "1",
    }
    out = subprocess.run(
        ["bash", str(ROOT / "tests" / "e2e" / "build.sh")],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.splitlines()


def test_e2e_build_says_what_it_builds_first(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    go = tmp_path / "bin" / "go"
    go.write_text(FAKE_GO)
    go.chmod(0o755)
    first = build(tmp_path)
    assert first[0].startswith("e2e: building devicemanager at Kubernetes v1.37.2 (once;")
    assert first[1].startswith("e2e: built devicemanager at Kubernetes v1.37.2 in ")
    assert any(line.startswith("e2e: building drakubelet") for line in first)
    again = build(tmp_path)
    assert again == [
        f"e2e: devicemanager v1.37.2 cached at {tmp_path}/cache/v1.37.2/devicemanager",
        f"e2e: drakubelet v1.37.2 cached at {tmp_path}/cache/v1.37.2/drakubelet",
        f"e2e: drakubelet v1.32.13 cached at {tmp_path}/cache/v1.32.13/drakubelet",
    ]
