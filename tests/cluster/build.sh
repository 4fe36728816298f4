#!/usr/bin/env bash
# Builds the local control plane's binaries from the Go module proxy into a cache outside the
# repository, only those that are missing:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (Kubernetes v1.36.4)
#   etcd (v3.6.10), kwok and kwokctl (v0.8.0)
# Nothing from GitHub releases or dl.k8s.io is needed: only `go` and its module proxy.
#
#   tests/cluster/build.sh            build what is missing, print the bin directory
#   tests/cluster/build.sh --check    exit 0 when nothing is missing, 1 otherwise (builds nothing)
#
# PNEUMONIA_K8S_CACHE overrides the cache root (default ~/.cache/pneumonia-k8s). Each binary is
# built under a temporary name and moved into place, so an interrupted build leaves no half file.
# Other tools (the Kueue helper) add their binaries to the same directory the same way.
set -euo pipefail

KUBE_VERSION=v1.36.4
ETCD_VERSION=v3.6.10
KWOK_VERSION=v0.8.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${PNEUMONIA_K8S_CACHE:-$HOME/.cache/pneumonia-k8s}"
bin="$cache_root/$KUBE_VERSION/bin"

kube_binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
all_binaries=("${kube_binaries[@]}" etcd kwok kwokctl)

missing=()
for name in "${all_binaries[@]}"; do
  [[ -x "$bin/$name" ]] || missing+=("$name")
done

if [[ "${1:-}" == "--check" ]]; then
  if ((${#missing[@]})); then echo "missing in $bin: ${missing[*]}" >&2; exit 1; fi
  exit 0
fi

if ((${#missing[@]} == 0)); then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: 'go' is not on PATH; install Go >= 1.26 to build ${missing[*]}" >&2; exit 2; }
mkdir -p "$bin"

# Static, reproducible, no toolchain download: the binaries run on any Linux of this arch.
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly
common_flags=(-trimpath)

is_missing() { [[ " ${missing[*]} " == *" $1 "* ]]; }

# Build into a temporary file beside the target, then rename: never a half-written binary.
install_built() { chmod 0755 "$1" && mv -f "$1" "$bin/$2"; }

kube_ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=36 \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION \
 -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=36"

for name in "${kube_binaries[@]}"; do
  is_missing "$name" || continue
  echo "build.sh: building $name $KUBE_VERSION" >&2
  (cd "$here/go/kubernetes" && go build "${common_flags[@]}" -ldflags "$kube_ldflags" \
     -o "$bin/.$name.tmp" "k8s.io/kubernetes/cmd/$name")
  install_built "$bin/.$name.tmp" "$name"
done

if is_missing etcd; then
  echo "build.sh: building etcd $ETCD_VERSION" >&2
  (cd "$here/go/etcd" && go build "${common_flags[@]}" \
     -ldflags "-s -w" -o "$bin/.etcd.tmp" go.etcd.io/etcd/server/v3)
  install_built "$bin/.etcd.tmp" etcd
fi

# kwok's own go.mod has no replace directives, so `go install module@version` builds it as
# released. Its default Kubernetes version is stamped to ours so kwokctl never asks for another.
for name in kwok kwokctl; do
  is_missing "$name" || continue
  echo "build.sh: building $name $KWOK_VERSION" >&2
  gobin="$(mktemp -d "$bin/.gobin.XXXXXX")"
  GOBIN="$gobin" GOFLAGS= go install "${common_flags[@]}" \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${KUBE_VERSION#v}" \
    "sigs.k8s.io/kwok/cmd/$name@$KWOK_VERSION"
  install_built "$gobin/$name" "$name"
  rmdir "$gobin"
done

echo "$bin"
