#!/usr/bin/env bash
# Builds the Kueue controller (v0.19.2, the newest tag that builds with Go 1.26) from the Go module
# proxy into a cache outside the repository, only when it is missing, and prints its bin directory.
# Its CRDs, webhook configurations and RBAC stay in the Go module cache (config/components/), where
# tests/kueue_env.py reads them; so does the ProvisioningRequest CRD (k8s.io/autoscaler/cluster-autoscaler/apis).
#
#   tests/cluster/build-kueue.sh           build if missing, print the bin directory
#   tests/cluster/build-kueue.sh --check   exit 0 when built, 1 otherwise (builds nothing)
#
# PNEUMONIA_K8S_CACHE overrides the cache root (default ~/.cache/pneumonia-k8s). About 150 s cold on
# an idle 2-core machine.
set -euo pipefail

KUEUE_VERSION=v0.19.2
cache_root="${PNEUMONIA_K8S_CACHE:-$HOME/.cache/pneumonia-k8s}"
bin="$cache_root/kueue-$KUEUE_VERSION/bin"

if [[ -x "$bin/kueue" ]]; then
  [[ "${1:-}" == "--check" ]] || echo "$bin"
  exit 0
fi
[[ "${1:-}" == "--check" ]] && { echo "missing: $bin/kueue" >&2; exit 1; }
command -v go >/dev/null || { echo "build-kueue.sh: 'go' is not on PATH; install Go >= 1.26" >&2; exit 2; }

mkdir -p "$bin"
staging="$(mktemp -d "$bin/.build.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
# Static, no toolchain download; built under a temporary directory, then moved: never a half binary.
CGO_ENABLED=0 GOTOOLCHAIN=local GOBIN="$staging" \
  go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
mv -f "$staging/kueue" "$bin/kueue"
# The module's config/ (CRDs, webhooks) must be in the module cache even if the binary came from elsewhere.
GOFLAGS=-mod=mod go mod download "sigs.k8s.io/kueue@$KUEUE_VERSION" >/dev/null
echo "$bin"
