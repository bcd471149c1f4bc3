#!/usr/bin/env bash
# Builds the Kueue manager $KUEUE_VERSION from the Go module proxy and copies its CRDs and
# webhook manifests from the module, for the stack's `kueue` part (deploy/local/kueue.sh).
# Kueue's go.mod has no replace directives, so a plain `go install ...@version` works (if a
# later version adds some, use build-keda.sh's wrapper module). Everything (binary,
# manifests and this build's Go module and build caches) lives under $KUEUE_HOME, so a
# second run reuses it and `rm -rf $KUEUE_HOME` removes every trace. Prints the binary's path.
source "$(dirname "$0")/common.sh"

export GOMODCACHE="${GOMODCACHE_OVERRIDE:-$KUEUE_HOME/go/mod}"
export GOCACHE="${GOCACHE_OVERRIDE:-$KUEUE_HOME/go/build}"
# GOTOOLCHAIN=local: build with the machine's Go rather than fetch another toolchain.
export GOTOOLCHAIN=local

manager="$KUEUE_BIN/kueue"
manifests="$KUEUE_HOME/manifests"
if [[ -x "$manager" && -n "$(ls "$manifests"/crd/*.yaml 2>/dev/null)" \
      && -f "$manifests/webhook/manifests.yaml" && -f "$manifests/crd-patches/kustomization.yaml" ]]; then
  log "kueue $KUEUE_VERSION cached in $KUEUE_BIN"; echo "$manager"; exit 0
fi

buildlog="$KUEUE_HOME/build.log"
mkdir -p "$KUEUE_BIN" "$manifests/crd" "$manifests/crd-patches" "$manifests/webhook"
log "building kueue $KUEUE_VERSION; log: $buildlog"

start=$SECONDS
info="$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" 2>>"$buildlog")" \
  || die "go mod download sigs.k8s.io/kueue@$KUEUE_VERSION" "$buildlog"
src="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])' <<<"$info")"

# The version Kueue's own release build stamps (it shows in its startup log and metrics).
ldflags="-s -w -X=sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
[[ -x "$manager" ]] || GOBIN="$KUEUE_BIN/.tmp" go install -trimpath -ldflags "$ldflags" \
  "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION" >>"$buildlog" 2>&1 \
  || die "go install sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION" "$buildlog"
cp "$src"/config/components/crd/bases/*.yaml "$manifests/crd/"
cp "$src"/config/components/crd/patches/webhook_in_*.yaml "$manifests/crd-patches/"
# Which of those patches Kueue's own kustomization applies (some are commented out).
cp "$src/config/components/crd/kustomization.yaml" "$manifests/crd-patches/"
cp "$src/config/components/webhook/manifests.yaml" "$manifests/webhook/"
chmod -R u+w "$manifests"
if [[ ! -x "$manager" ]]; then mv "$KUEUE_BIN/.tmp/kueue" "$manager" && rmdir "$KUEUE_BIN/.tmp"; fi
log "kueue $KUEUE_VERSION built (or its manifests copied) in $((SECONDS - start))s into $KUEUE_HOME"
echo "$manager"
