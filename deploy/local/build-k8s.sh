#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (the tests
# check how kubectl resolves jobrunner's names beside KEDA's), and the real node's kubelet
# and kube-proxy (stack-up.sh's up_node) from the Go module
# k8s.io/kubernetes at $K8S_VERSION. Its go.mod pins every staging module at v0.0.0 with a
# local replace, so `go install` refuses it; a wrapper module replaces each staging module
# with its published v0.<minor>.<patch> release instead. Output is cached by version.
source "$(dirname "$0")/common.sh"

if [[ -x "$K8S_BIN/kube-apiserver" && -x "$K8S_BIN/kube-controller-manager" && -x "$K8S_BIN/kube-scheduler" && -x "$K8S_BIN/kubectl" \
      && -x "$K8S_BIN/kubelet" && -x "$K8S_BIN/kube-proxy" ]]; then
  log "kubernetes $K8S_VERSION binaries cached in $K8S_BIN"; exit 0
fi

work="$JOBRUNNER_CACHE/k8s-$K8S_VERSION/src"
buildlog="$JOBRUNNER_CACHE/k8s-$K8S_VERSION/build.log"
mkdir -p "$work" "$K8S_BIN"
staging_version="v0.${K8S_VERSION#v1.}"
log "building kubernetes $K8S_VERSION (staging $staging_version) in $work; log: $buildlog"

cd "$work"
go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null 2>>"$buildlog" \
  || die "go mod download k8s.io/kubernetes@$K8S_VERSION" "$buildlog"
upstream_mod="$GOMODCACHE/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
{
  echo "module jobrunner.local/k8s-build"
  echo
  grep -E '^go ' "$upstream_mod"
  grep -E '^godebug ' "$upstream_mod" || true
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  # Every local staging replace upstream becomes its published release.
  grep -E '^\s*k8s.io/[a-z0-9-]+ => \./staging/' "$upstream_mod" \
    | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
  echo ")"
} > go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
go mod tidy -e >>"$buildlog" 2>&1 || die "go mod tidy (k8s wrapper module in $work)" "$buildlog"

ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)"
start=$SECONDS
# One go build for all six: they share the package cache.
go build -trimpath -ldflags "$ldflags" -o "$K8S_BIN/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kube-proxy >>"$buildlog" 2>&1 \
  || die "go build k8s.io/kubernetes/cmd/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl,kubelet,kube-proxy}@$K8S_VERSION" "$buildlog"
log "kubernetes $K8S_VERSION built in $((SECONDS - start))s into $K8S_BIN"
