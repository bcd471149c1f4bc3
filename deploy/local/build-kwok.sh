#!/usr/bin/env bash
# Builds kwok $KWOK_VERSION (sigs.k8s.io/kwok has no replace directives, so go install
# works) and keeps its stage YAML from the module source: v0.8.0 ships no built-in stages.
source "$(dirname "$0")/common.sh"

if [[ -x "$KWOK_BIN/kwok" ]]; then log "kwok $KWOK_VERSION cached in $KWOK_BIN"; exit 0; fi
buildlog="$JOBRUNNER_CACHE/kwok-$KWOK_VERSION/build.log"
mkdir -p "$KWOK_BIN"
start=$SECONDS
GOBIN="$KWOK_BIN" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >>"$buildlog" 2>&1 \
  || die "go install sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "$buildlog"
log "kwok $KWOK_VERSION built in $((SECONDS - start))s into $KWOK_BIN"
