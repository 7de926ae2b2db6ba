#!/usr/bin/env bash
# make image-test: prove the container image on a machine with no container registry.
# Installs Debian's docker.io and debootstrap if missing, starts its own isolated dockerd,
# makes the base the Dockerfile pins (debian:bookworm-slim) the way Docker's is made, from a
# debootstrap'd bookworm minbase, imported under the pinned name's role (DEBIAN_IMAGE), then
# builds the Dockerfile as it is (its apt step reaches the Debian mirror; pip stays offline,
# PIP_NO_INDEX=1, from wheels prepared beforehand), runs `python -m aiodp demo` in it with no
# network, checks what the runtime must not hold, and reports the size. The same again for
# arm64 under qemu-user where this machine can register it (binfmt_misc); where it cannot,
# it says so and why. Stops everything it started, by PID. With AIODP_IMAGE_SAVE=file (make
# cluster-e2e) only amd64 is proved, then saved there as the chart's image:tag.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${AIODP_IMAGE_WORK:-/tmp/aiodp-image-test}
sock="$work/docker.sock"
export DOCKER_HOST="unix://$sock"
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
version=$(python3 -c 'import sys; sys.path.insert(0, "."); from aiodp._version import VERSION; print(VERSION)')

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
    rm -rf "$work/rootfs-"*
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

# arm64 runs under qemu-user: binfmt_misc with qemu-aarch64 registered (F flag: usable
# inside containers). Answers "" when it works, else why not.
arm64_blocker() {
    [ "$(uname -m)" = aarch64 ] && return 0
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
            || { echo "binfmt_misc cannot be mounted here"; return 0; }
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends qemu-user-static binfmt-support; } >/dev/null 2>&1 \
            || { echo "qemu-user-static could not be installed"; return 0; }
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
        || echo "qemu-aarch64 is not registered with the F flag (needed inside containers)"
}

# prove ARCH (amd64 or arm64): base, build, demo, contents, size, bytecode
prove() {
    local arch=$1 base=local/debian:bookworm-minbase-$1 image=aiodp:image-test-$1
    step "$arch: base from debootstrap --variant=minbase bookworm ($mirror)"
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        rm -rf "$work/rootfs-$arch"
        debootstrap --arch="$arch" --variant=minbase bookworm "$work/rootfs-$arch" "$mirror" \
            >"$work/debootstrap-$arch.log" 2>&1 || { tail -20 "$work/debootstrap-$arch.log"; exit 1; }
        rm -rf "$work/rootfs-$arch/var/cache/apt/archives/"*.deb "$work/rootfs-$arch/var/lib/apt/lists/"*
        # `docker import --platform` keeps the host's architecture on this engine; a FROM
        # scratch build with --platform records the right one
        mkdir -p "$work/base-$arch"
        tar -C "$work/rootfs-$arch" -cf "$work/base-$arch/rootfs.tar" .
        printf 'FROM scratch\nADD rootfs.tar /\nCMD ["bash"]\n' >"$work/base-$arch/Dockerfile"
        docker build --platform "linux/$arch" --network=none -t "$base" "$work/base-$arch" >/dev/null
        rm -rf "$work/base-$arch"
    fi
    docker image inspect "$base" --format '{{.Os}}/{{.Architecture}}'

    step "$arch: docker build (the Dockerfile as it is, DEBIAN_IMAGE=$base; pip offline)"
    docker build --platform "linux/$arch" --network=host \
        --build-arg DEBIAN_IMAGE="$base" --build-arg PIP_NO_INDEX=1 \
        --build-arg VERSION="$version" \
        --build-arg COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" \
        --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        -t "$image" . >"$work/build-$arch.log" 2>&1 || { tail -30 "$work/build-$arch.log"; exit 1; }
    tail -2 "$work/build-$arch.log"

    step "$arch: python -m aiodp demo inside the image (no network)"
    docker run --rm --platform "linux/$arch" --network=none "$image" demo

    step "$arch: image"
    docker image inspect "$image" --format 'platform {{.Os}}/{{.Architecture}} entrypoint {{json .Config.Entrypoint}} cmd {{json .Config.Cmd}}'
    docker image inspect "$image" --format 'labels {{json .Config.Labels}}'
    local size basesize
    size=$(docker image inspect "$image" --format '{{.Size}}')
    basesize=$(docker image inspect "$base" --format '{{.Size}}')
    echo "image size: $((size / 1024 / 1024)) MiB (base $((basesize / 1024 / 1024)) MiB, python and aiodp $(((size - basesize) / 1024 / 1024)) MiB)"
    # each name on its own (dash's `command -v a b c` answers for the first only)
    if ! docker run --rm --platform "linux/$arch" --network=none --entrypoint sh "$image" -c '
        for c in gcc cc pip pip3 python3-config; do
            if command -v "$c"; then echo "unexpected in the runtime image: $c"; exit 1; fi
        done
        for m in setuptools pkg_resources; do
            if python -c "import $m" 2>/dev/null; then echo "unexpected module: $m"; exit 1; fi
        done
        ls /opt/aiodp/bin/activate* /opt/aiodp/bin/protoc-gen-* 2>/dev/null && exit 1
        ls /var/lib/apt/lists/*_Packages 2>/dev/null && { echo "apt lists left behind"; exit 1; }
        test -f /usr/share/doc/aiodp/LICENSE || { echo "no LICENSE"; exit 1; }
        python -m aiodp --version
        # the GPU Operator runs these by name; argv[0] is what its config-manager signals
        nvidia-device-plugin --version && config-manager --help >/dev/null
        nvidia-device-plugin --help >/dev/null'; then
        echo "image-test: the $arch runtime image holds what it should not"; exit 1
    fi
    step "$arch: start-up imports come from bytecode (read-only root)"
    docker run --rm --platform "linux/$arch" --network=none --read-only --entrypoint python "$image" \
        -X importtime -c "import aiodp.app" 2>&1 | tail -1
    if [ "$arch" = "$(dpkg --print-architecture 2>/dev/null || echo amd64)" ]; then
        # timed natively only: under qemu-user the figure would be qemu's
        docker run --rm -i --platform "linux/$arch" --network=none --read-only --tmpfs /tmp \
            --entrypoint python "$image" - < scripts/image_startup.py
    fi
}

step "wheels for the image (made beforehand, on the host: both architectures)"
ls wheelhouse/*.whl | wc -l
ls wheelhouse/*aarch64*.whl >/dev/null 2>&1 || { echo "no aarch64 wheels: run make wheels-image"; exit 1; }

step "hadolint"
hadolint Dockerfile && echo "hadolint: clean"

prove amd64
if [ -n "${AIODP_IMAGE_SAVE:-}" ]; then
    # make cluster-e2e: the amd64 image, tagged as the chart names it, saved for `ctr import`
    tag="$(awk '/^  repository:/ {print $2; exit}' charts/nvidia-gpu/values.yaml):$version"
    docker tag aiodp:image-test-amd64 "$tag"
    docker save "$tag" -o "$AIODP_IMAGE_SAVE"
    echo "image-test: PASS (amd64); saved $tag to $AIODP_IMAGE_SAVE (arm64 left to make image-test)"
    exit 0
fi
blocker=$(arm64_blocker)
if [ -z "$blocker" ]; then
    prove arm64
    echo "image-test: PASS (amd64, arm64 under qemu-user)"
else
    echo "image-test: arm64 not run: $blocker"
    echo "image-test: PASS (amd64 only)"
fi
