#!/usr/bin/env bash
# Runs as PID 1 of the cluster's own mount, network and PID namespaces (tests/cluster/run.sh):
# makes the node's directories and network, runs the scenarios, then stops what is left and
# removes the kubepods cgroups. The host's /var, /run and network are never written.
set -euo pipefail
work="$AIODP_CLUSTER_WORK"

# Every mount shared within this namespace (and a slave of the host's): the kubelet's
# HostToContainer volumes need shared or slave sources.
mount --make-rshared /
mkdir -p "$work/var/upper" "$work/var/work" "$work/kubelet"
mount -t overlay overlay -o "lowerdir=/var,upperdir=$work/var/upper,workdir=$work/var/work" /var
mkdir -p /var/lib/kubelet
mount --bind "$work/kubelet" /var/lib/kubelet
mount -t tmpfs -o mode=755 tmpfs /run
mount --make-rshared /var
mount --make-rshared /run

# The node's network: 10.200.0.1 is the node, 10.96.0.1 the kubernetes Service's IP, which
# the API server answers here itself (no kube-proxy); pods get 10.88.0.0/24 from a bridge.
ip link set lo up
ip link add aiodp0 type veth peer name aiodp1  # (no dummy module on every kernel; CNI needs veth anyway)
ip link set aiodp1 up
ip addr add 10.200.0.1/24 dev aiodp0
ip addr add 10.96.0.1/32 dev aiodp0
ip link set aiodp0 up
ip route add default dev aiodp0

cleanup() {
    # The tests stop what they started, by PID; whatever outlived them (a container's process,
    # a shim) is in this PID namespace, of which this shell is PID 1: TERM, then KILL.
    kill -TERM -1 2>/dev/null || true
    for _ in $(seq 50); do kill -0 -1 2>/dev/null || break; sleep 0.2; done
    kill -KILL -1 2>/dev/null || true
    while kill -0 -1 2>/dev/null; do sleep 0.1; done
    # containers' and pods' cgroups, deepest first, in every hierarchy
    for h in /sys/fs/cgroup/*/; do
        if [ -d "$h/kubepods" ]; then find "$h/kubepods" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
    done
    # the overlay's work dir is root-owned 000: let run.sh delete it
    chmod -R u+rwx "$work/var/work" 2>/dev/null || true
}
trap cleanup EXIT
cd "$(dirname "$0")/../.."
eval "set -- ${PYTEST_ARGS:-}"  # quoted words kept: PYTEST_ARGS="-k 'a or b'"
.venv/bin/python -m pytest -p no:cacheprovider -q -rA tests/cluster "$@"
