#!/usr/bin/env bash
# make cluster-e2e: a real single-node cluster on this machine, and aiodp installed on it
# from the chart with its own image. Phases, each printed with its time:
#   1. checks: root, mount/network/PID namespaces, Go (it fails saying what is missing; never
#      a skip);
#   2. builds, cached outside the tree: tests/e2e/build.sh's etcd, kube-apiserver and
#      kube-scheduler, tests/cluster/build.sh's kubelet, kube-controller-manager, kubectl,
#      containerd and Debian's runc/CNI/busybox;
#   3. the image: the top-level Dockerfile built as `make image-test` builds it, saved as a
#      tarball (cached by the hash of what goes into it);
#   4. the cluster and its tests (pytest tests/cluster) inside one `unshare -m -n -p`:
#      /var an overlay, /var/lib/kubelet a bind mount of the work directory, /run a tmpfs, a
#      network namespace of its own (no host interface, no host port used). When it ends the
#      processes are stopped by PID, the kubepods cgroups removed, the work directory deleted,
#      and this script checks that nothing is left.
#
#   AIODP_CLUSTER_KEEP=1   keep the work directory (logs) after the run
#   PYTEST_ARGS="-k ..."   pass on to pytest
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
cache="${AIODP_E2E_CACHE:-$HOME/.cache/aiodp-e2e}"
export AIODP_E2E_CACHE="$cache"
start=$SECONDS
phase() { printf '\n== cluster-e2e [%4d s] %s\n' "$((SECONDS - start))" "$*"; }
fail() { echo "cluster-e2e: $*" >&2; exit 1; }

phase "checks"
[ "$(id -u)" = 0 ] || fail "needs root (mount and network namespaces, cgroups, containerd)"
command -v unshare >/dev/null || fail "unshare (util-linux) is missing"
unshare -m -n -p -f --mount-proc true 2>/dev/null || fail "cannot make mount, network and PID namespaces here (unshare -m -n -p)"
command -v go >/dev/null || fail "Go is not installed; the cluster's pieces are built from their Go modules"
command -v openssl >/dev/null || fail "openssl is missing (the cluster's certificates)"
command -v ip >/dev/null || fail "ip (iproute2) is missing (the cluster's network namespace)"
[ -d /sys/fs/cgroup/memory ] || fail "no cgroup v1 memory hierarchy: the kubelet here runs on cgroup v1 (cgroupfs)"
[ -x .venv/bin/python ] || fail "no .venv: run make install first"

phase "builds (cached under $cache)"
bash tests/e2e/build.sh | grep -v "devicemanager\|drakubelet" || true
[ -x "$cache/bin/kube-apiserver-v1.37.2" ] || fail "tests/e2e/build.sh did not build kube-apiserver"
bash tests/cluster/build.sh

phase "image (the Dockerfile, as make image-test builds it)"
key=$(cat Dockerfile pyproject.toml README.md LICENSE image/bin/* $(git ls-files aiodp | sort) | sha256sum | cut -c1-16)
image="$cache/image/aiodp-$key.tar"
if [ -f "$image" ]; then
    echo "cluster-e2e: image cached at $image (same Dockerfile, package and sources)"
else
    mkdir -p "$cache/image" && rm -f "$cache/image/"aiodp-*.tar
    make --no-print-directory wheels-image
    AIODP_IMAGE_SAVE="$image.tmp" PATH="$repo/.venv/bin:$PATH" bash scripts/image-test.sh
    mv "$image.tmp" "$image"
fi
export AIODP_CLUSTER_IMAGE="$image"

phase "cluster and scenarios (one mount, network and PID namespace)"
work=$(mktemp -d /tmp/aiodp-cluster.XXXXXX)
export AIODP_CLUSTER_WORK="$work"
rc=0
unshare -m -n -p -f --mount-proc --propagation slave bash tests/cluster/inside.sh || rc=$?

phase "teardown check"
leftover=""
grep -q " $work" /proc/mounts && leftover+=" mounts under $work;"
for h in /sys/fs/cgroup/*/; do [ -d "$h/kubepods" ] && leftover+=" $h/kubepods;"; done
pgrep -f "$cache/bin/(kubelet|containerd|kube-|etcd)" >/dev/null && leftover+=" processes of the cluster;"
if [ -z "${AIODP_CLUSTER_KEEP:-}" ]; then rm -rf "$work"; else echo "cluster-e2e: kept $work"; fi
if [ -n "$leftover" ]; then
    echo "cluster-e2e: left behind:$leftover" >&2; rc=1
else
    echo "cluster-e2e: nothing left on the machine (no mount, cgroup or process of the cluster)"
fi
phase "done (rc $rc)"
exit $rc
