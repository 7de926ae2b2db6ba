#!/usr/bin/env bash
# make gpu-check: on a GPU machine with no internet access. Installs aiodp and the test
# tools from wheelhouse/ (made beforehand by `make wheels` and carried along), runs the gpu
# tests and the smoke run, in under two minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON_GPU:-python3.12}
"$PY" --version >/dev/null 2>&1 || PY=python3
venv=$(mktemp -d /tmp/aiodp-gpu-venv.XXXX)
"$PY" -m venv "$venv"
"$venv/bin/pip" install --quiet --no-index --find-links wheelhouse aiodp pytest pytest-asyncio pytest-timeout looptime
nvidia-smi -L || true
cd "$(mktemp -d)"  # run the installed package, not the source tree
cp -r "$OLDPWD/tests" "$OLDPWD/pyproject.toml" .
timeout 100 "$venv/bin/python" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
timeout 60 "$venv/bin/python" "$OLDPWD/scripts/gpu_check.py"
