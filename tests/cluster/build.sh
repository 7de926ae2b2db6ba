#!/usr/bin/env bash
# Build what `make cluster-e2e` runs beside tests/e2e/build.sh's peers, cached outside the tree:
# the kubelet and kube-controller-manager (Kubernetes Go modules), containerd 2.x with ctr and
# the runc shim (containerd's Go module), the pause program, and Debian's runc, CNI plugins
# and busybox-static unpacked from their .deb files (nothing is installed on the host).
#
#   AIODP_E2E_CACHE=dir ...          where builds go (default ~/.cache/aiodp-e2e)
#
# Fails saying what is missing (Go, the module proxy, apt); never a silent skip.
set -euo pipefail
# shellcheck source=../e2e/build.sh
source "$(dirname "$0")/../e2e/build.sh"  # build_main (it sets its own `here` and `cache`)
here="$(cd "$(dirname "$0")" && pwd)"
cache="${AIODP_E2E_CACHE:-$HOME/.cache/aiodp-e2e}"
k8s="${AIODP_CLUSTER_K8S:-v1.37.2}"
containerd="${AIODP_CLUSTER_CONTAINERD:-v2.2.10}"
mkdir -p "$cache/bin" "$cache/src"
command -v go >/dev/null || { echo "cluster-e2e: Go is not installed; make cluster-e2e needs it" >&2; exit 1; }

stamp() {  # the version flags that kubectl version and the node's kubeletVersion read
    local v="$1" minor="${1#v1.}"; minor="${minor%%.*}"
    echo "-X k8s.io/component-base/version.gitVersion=$v -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
}

build_k8s() {  # name: cmd/<name> of k8s.io/kubernetes, stamped, by tests/e2e/build.sh's build_main
    build_main "$1" "k8s.io/kubernetes@$k8s" "k8s.io/kubernetes/cmd/$1" "$k8s" "$(stamp "$k8s")"
}

build_containerd() {
    local dir="$cache/bin/containerd-$containerd"
    if [ -x "$dir/containerd" ] && [ -x "$dir/ctr" ] && [ -x "$dir/containerd-shim-runc-v2" ]; then
        echo "cluster-e2e: containerd $containerd cached at $dir"; return
    fi
    local start=$SECONDS
    echo "cluster-e2e: building containerd $containerd (once)"
    mkdir -p "$dir.tmp"
    (
        cd "$cache/src"
        for cmd in containerd ctr containerd-shim-runc-v2; do
            GOBIN="$dir.tmp" CGO_ENABLED=0 GOFLAGS=-mod=mod go install -trimpath \
                -tags no_btrfs,no_devmapper,no_zfs -ldflags "-s -w" \
                "github.com/containerd/containerd/v2/cmd/$cmd@$containerd"
        done
    ) || { echo "cluster-e2e: building containerd $containerd failed (is the Go module proxy reachable?)" >&2; exit 1; }
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
    echo "cluster-e2e: built containerd in $((SECONDS - start)) s -> $dir"
}

build_pause() {
    local out="$cache/bin/pause" key
    key="$(sha256sum "$here/pause/main.go" | cut -c1-16)"
    if [ -x "$out" ] && [ "$(cat "$out.key" 2>/dev/null)" = "$key" ]; then
        echo "cluster-e2e: pause cached at $out"; return
    fi
    local src="$cache/src/pause"
    rm -rf "$src" && mkdir -p "$src" && cp "$here/pause/main.go" "$src/"
    (cd "$src" && printf 'module aiodp.test/pause\n\ngo 1.24\n' > go.mod \
        && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out" .)
    echo "$key" > "$out.key"
    echo "cluster-e2e: built pause -> $out"
}

unpack_debs() {  # Debian's runc, CNI plugins, busybox-static: downloaded, unpacked, not installed
    local root="$cache/debian" pkgs="runc containernetworking-plugins busybox-static"
    if [ -x "$root/usr/sbin/runc" ] && [ -x "$root/usr/lib/cni/bridge" ] && [ -x "$root/bin/busybox" ]; then
        echo "cluster-e2e: Debian's runc, CNI plugins and busybox cached under $root"; return
    fi
    command -v apt-get >/dev/null || { echo "cluster-e2e: apt-get is missing (Debian's runc, CNI plugins, busybox-static)" >&2; exit 1; }
    local debs="$cache/src/debs"
    rm -rf "$debs" && mkdir -p "$debs" "$root"
    # shellcheck disable=SC2086
    (cd "$debs" && { apt-get download $pkgs >/dev/null 2>&1 || { apt-get update -qq && apt-get download $pkgs >/dev/null; }; }) \
        || { echo "cluster-e2e: apt-get download $pkgs failed (is Debian's mirror reachable?)" >&2; exit 1; }
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$root"; done
    echo "cluster-e2e: unpacked $pkgs under $root"
}

unpack_debs
build_pause
build_containerd
build_k8s kubelet
build_k8s kube-controller-manager
build_k8s kubectl  # the tests drive the cluster as an operator does: apply, exec, logs, label
