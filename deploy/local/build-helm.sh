#!/usr/bin/env bash
# Builds Helm $HELM_VERSION from the Go module proxy (helm.sh/helm/v3 has no replace
# directives, so go install works), cached by version like the stack's other binaries.
# The chart tests run its lint and template; helm install goes to the local cluster.
#
# A plain go install leaves Helm's built-in Kubernetes version at its fallback (v1.20),
# which `helm lint` and `helm template` check kubeVersion and deprecations against; the
# ldflags set it to the stack's Kubernetes, and the version string, as Helm's Makefile does.
source "$(dirname "$0")/common.sh"

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
HELM_BIN="$JOBRUNNER_CACHE/helm-$HELM_VERSION/bin"

if [[ -x "$HELM_BIN/helm" ]]; then log "helm $HELM_VERSION cached in $HELM_BIN"; exit 0; fi
buildlog="$JOBRUNNER_CACHE/helm-$HELM_VERSION/build.log"
mkdir -p "$HELM_BIN"
k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in pkg/chartutil pkg/lint/rules; do
  ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$k8s_minor"
done
start=$SECONDS
GOBIN="$HELM_BIN" nice -n 10 go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
  >>"$buildlog" 2>&1 || die "go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "$buildlog"
"$HELM_BIN/helm" version --short >>"$buildlog" 2>&1 || die "$HELM_BIN/helm version" "$buildlog"
log "helm $HELM_VERSION built in $((SECONDS - start))s into $HELM_BIN ($("$HELM_BIN/helm" version --short))"
