#!/usr/bin/env bash
# Fetches KEDA $KEDA_VERSION's CRDs (config/crd/bases of its module, 2.8 MB from the Go
# module proxy, no build) into $KEDA_HOME/crds and prints that directory. The tests of
# jobrunner's opt-in takeover of keda.sh ScaledJobs need KEDA's real ScaledJob CRD on the
# cluster, not the operator; build-keda.sh fills the same directory when it builds.
source "$(dirname "$0")/common.sh"

crds="$KEDA_HOME/crds"
if [[ -n "$(ls "$crds"/*.yaml 2>/dev/null)" ]]; then echo "$crds"; exit 0; fi
export GOMODCACHE="${GOMODCACHE_OVERRIDE:-$KEDA_HOME/go/mod}" GOTOOLCHAIN=local GOFLAGS=
command -v go >/dev/null || die "go is required to fetch KEDA's CRDs from the Go module proxy"
mkdir -p "$crds" "$LOG_DIR"
fetchlog="$LOG_DIR/keda-crds-fetch.log"
info="$(cd "$KEDA_HOME" && go mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" 2>"$fetchlog")" \
  || die "go mod download github.com/kedacore/keda/v2@$KEDA_VERSION" "$fetchlog"
module_dir="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])' <<<"$info")"
cp "$module_dir"/config/crd/bases/*.yaml "$crds/"
chmod u+w "$crds"/*.yaml
log "keda $KEDA_VERSION CRDs in $crds"
echo "$crds"
