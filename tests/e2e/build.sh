#!/usr/bin/env bash
# Build the Go test peers of `make e2e` from the Kubernetes Go modules, cached outside the tree.
#
#   tests/e2e/build.sh               every peer at every version below
#   AIODP_E2E_CACHE=dir ...          where builds go (default ~/.cache/aiodp-e2e)
#
# Prints what it built (or found cached) and how long it took. Needs Go and the module proxy;
# without them it fails and says so (never a silent skip).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${AIODP_E2E_CACHE:-$HOME/.cache/aiodp-e2e}"
# The newest served release, and the oldest of v1.32-v1.34 that builds.
versions="${AIODP_E2E_VERSIONS:-v1.37.2 v1.32.13}"
mkdir -p "$cache"

if ! command -v go >/dev/null; then
    echo "e2e: Go is not installed; make e2e needs it (the tests are never skipped)" >&2
    exit 1
fi

build_peer() {  # peer version
    local peer="$1" version="$2"
    local minor="${version#v1.}"; minor="${minor%%.*}"
    local staging="v0.${version#v1.}"
    local tags=""
    if [ "$minor" -lt 33 ]; then tags="k8sold"; fi
    if [ "$minor" -lt 34 ]; then tags="${tags:+$tags,}k8spre34"; fi
    local key  # the peer's source, the version and the tags: what the binary is made of
    key="$(cat "$here/$peer"/*.go <(echo "$version $tags") | sha256sum | cut -c1-16)"
    local out="$cache/$version/$peer"
    if [ -x "$out" ] && [ "$(cat "$out.key" 2>/dev/null)" = "$key" ]; then
        echo "e2e: $peer $version cached at $out"
        return
    fi
    local src="$cache/src/$peer-$version"
    echo "e2e: building $peer at Kubernetes $version (once; later runs use $cache)"
    rm -rf "$src" && mkdir -p "$src" "$cache/$version"
    cp "$here/$peer"/*.go "$src/"
    local gomod
    gomod="$(go env GOMODCACHE)/k8s.io/kubernetes@$version/go.mod"
    local start=$SECONDS
    (
        cd "$src"
        {
            echo "module aiodp.test/e2e/$peer"
            echo
            echo "go 1.24"
            echo
            echo "require k8s.io/kubernetes $version"
        } > go.mod
        if [ ! -f "$gomod" ]; then
            GOFLAGS=-mod=mod go mod download k8s.io/kubernetes@"$version"
        fi
        echo "replace (" >> go.mod
        sed -n '/^replace (/,/^)/p' "$gomod" | grep '=> ./staging' | awk -v v="$staging" '{print "\t" $1 " => " $1 " " v}' >> go.mod
        echo ")" >> go.mod
        go mod tidy >/dev/null 2>"$src/tidy.log" || { cat "$src/tidy.log" >&2; exit 1; }
        go build -tags "$tags" -trimpath -ldflags "-s -w -X main.kubernetesVersion=$version" -o "$out" .
    ) || {
        echo "e2e: building $peer at Kubernetes $version failed (is the Go module proxy reachable?)" >&2
        exit 1
    }
    echo "$key" > "$out.key"
    echo "e2e: built $peer at Kubernetes $version in $((SECONDS - start)) s -> $out"
}

build_main() {  # name module@version package [replace-staging-of-kubernetes-version] [ldflags]
    local name="$1" modver="$2" pkg="$3" k8s="${4:-}" ldflags="${5:-}"
    local out="$cache/bin/$name-${modver##*@}"
    if [ -x "$out" ]; then
        echo "e2e: $name ${modver##*@} cached at $out"
        return
    fi
    local src="$cache/src/$name-${modver##*@}"
    echo "e2e: building $name from $modver (once; later runs use $cache)"
    rm -rf "$src" && mkdir -p "$src" "$cache/bin"
    local start=$SECONDS
    (
        cd "$src"
        printf 'module aiodp.test/e2e/%s\n\ngo 1.24\n\nrequire %s %s\n' "$name" "${modver%@*}" "${modver##*@}" > go.mod
        if [ -n "$k8s" ]; then
            local gomod staging="v0.${k8s#v1.}"
            gomod="$(go env GOMODCACHE)/k8s.io/kubernetes@$k8s/go.mod"
            [ -f "$gomod" ] || GOFLAGS=-mod=mod go mod download k8s.io/kubernetes@"$k8s"
            echo "replace (" >> go.mod
            sed -n '/^replace (/,/^)/p' "$gomod" | grep '=> ./staging' | awk -v v="$staging" '{print "\t" $1 " => " $1 " " v}' >> go.mod
            echo ")" >> go.mod
        fi
        printf 'package main\n\nimport _ "%s"\n' "$pkg" > tools.go
        go mod tidy >/dev/null 2>"$src/tidy.log" || { cat "$src/tidy.log" >&2; exit 1; }
        go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg"
        mv "$out.tmp" "$out"
    ) || {
        echo "e2e: building $name from $modver failed (is the Go module proxy reachable?)" >&2
        exit 1
    }
    echo "e2e: built $name from $modver in $((SECONDS - start)) s -> $out"
}

# Sourced (tests/cluster/build.sh uses build_main): the functions only.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

for version in $versions; do
    build_peer devicemanager "$version"
done
# The kubelet's plugin manager and DRA manager: the newest (DRA GA, dra v1 and the health
# stream) and 1.32 (DRA beta: dra v1beta1, resource.k8s.io/v1beta1).
for version in "${versions%% *}" ${AIODP_E2E_DRA_OLD:-v1.32.13}; do
    build_peer drakubelet "$version"
done
if [ -z "${AIODP_E2E_NO_APISERVER:-}" ]; then
    newest="${versions%% *}"
    build_main etcd "go.etcd.io/etcd/server/v3@${AIODP_E2E_ETCD:-v3.6.16}" go.etcd.io/etcd/server/v3
    build_main kube-apiserver "k8s.io/kubernetes@$newest" k8s.io/kubernetes/cmd/kube-apiserver "$newest"
    # places the DRA e2e pod: allocates its claim from the ResourceSlices we publish
    build_main kube-scheduler "k8s.io/kubernetes@$newest" k8s.io/kubernetes/cmd/kube-scheduler "$newest"
fi
