#!/usr/bin/env bash
# make image-test: prove the container image on a machine with no registry.
# Installs Debian's docker.io and debootstrap if missing, starts its own isolated dockerd,
# builds a Python base image with debootstrap + `docker import`, builds our image on it with
# --network=none from wheels prepared beforehand, runs `python -m aiodp demo` in it, reports
# the image size, and stops everything it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${AIODP_IMAGE_WORK:-/tmp/aiodp-image-test}
sock="$work/docker.sock"
export DOCKER_HOST="unix://$sock"
base=local/debian-python:bookworm
image=aiodp:image-test
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

step() { printf '\n== %s\n' "$*"; }

cleanup() {
    if [ -f "$work/dockerd.pid" ]; then
        pid=$(cat "$work/dockerd.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    # containerd started by dockerd exits with it; unmount what may remain, then remove
    grep " $work/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r umount -l 2>/dev/null || true
    rm -rf "$work/rootfs"
}
trap cleanup EXIT

step "tools"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io debootstrap >/dev/null
fi
dockerd --version
mkdir -p "$work"

step "dockerd (isolated: no bridge, no iptables)"
dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    --data-root "$work/data" --exec-root "$work/exec" -H "$DOCKER_HOST" \
    --pidfile "$work/dockerd.pid" >"$work/dockerd.log" 2>&1 &
for _ in $(seq 100); do docker version >/dev/null 2>&1 && break; sleep 0.2; done
docker version --format 'server {{.Server.Version}}'

step "base image from debootstrap ($mirror)"
if ! docker image inspect "$base" >/dev/null 2>&1; then
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase --include=python3-minimal,python3-venv \
        bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    tar -C "$work/rootfs" -c . | docker import - "$base" >/dev/null
fi
docker run --rm --network=none "$base" python3 --version

step "wheels for the image (made beforehand, on the host)"
ls wheelhouse | wc -l

step "hadolint"
hadolint Dockerfile && echo "hadolint: clean"

step "docker build --network=none"
docker build --network=none --build-arg BASE_IMAGE="$base" --build-arg PIP_NO_INDEX=1 \
    --build-arg VERSION="$(python3 -c 'import sys; sys.path.insert(0, "."); from aiodp._version import VERSION; print(VERSION)')" \
    --build-arg COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -t "$image" . >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
tail -3 "$work/build.log"

step "python -m aiodp demo inside the image"
docker run --rm --network=none "$image" demo

step "image"
docker image inspect "$image" --format 'entrypoint {{json .Config.Entrypoint}} cmd {{json .Config.Cmd}}'
docker image inspect "$image" --format 'labels {{json .Config.Labels}}'
size=$(docker image inspect "$image" --format '{{.Size}}')
basesize=$(docker image inspect "$base" --format '{{.Size}}')
echo "image size: $((size / 1024 / 1024)) MiB (base $((basesize / 1024 / 1024)) MiB, aiodp layer $(((size - basesize) / 1024 / 1024)) MiB)"
# each name on its own (dash's `command -v a b c` answers for the first only)
if ! docker run --rm --network=none --entrypoint sh "$image" -c '
    for c in gcc cc pip pip3 python3-config; do
        if command -v "$c"; then echo "unexpected in the runtime image: $c"; exit 1; fi
    done
    for m in setuptools pkg_resources; do
        if python -c "import $m" 2>/dev/null; then echo "unexpected module: $m"; exit 1; fi
    done
    ls /opt/aiodp/bin/activate* /opt/aiodp/bin/protoc-gen-* 2>/dev/null && exit 1
    test -f /usr/share/doc/aiodp/LICENSE || { echo "no LICENSE"; exit 1; }
    python -m aiodp --version'; then
    echo "image-test: the runtime image holds what it should not"; exit 1
fi
step "start-up imports come from bytecode (read-only root)"
docker run --rm --network=none --read-only --entrypoint python "$image" -X importtime -c "import aiodp.app" 2>&1 | tail -1
echo "image-test: PASS"
