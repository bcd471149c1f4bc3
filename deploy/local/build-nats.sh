#!/usr/bin/env bash
# Builds nats-server $NATS_VERSION (with JetStream) from the Go module
# github.com/nats-io/nats-server/v2 through a wrapper module, as build-etcd.sh does for
# etcd: the Go module proxy is the only source of it here. Output is cached by version.
source "$(dirname "$0")/common.sh"

if [[ -x "$NATS_BIN/nats-server" ]]; then log "nats-server $NATS_VERSION cached in $NATS_BIN"; exit 0; fi
work="$JOBRUNNER_CACHE/nats-server-$NATS_VERSION/src"
buildlog="$JOBRUNNER_CACHE/nats-server-$NATS_VERSION/build.log"
mkdir -p "$work" "$NATS_BIN"
cd "$work"
cat > go.mod <<MOD
module jobrunner.local/nats-server-build

go 1.24

require github.com/nats-io/nats-server/v2 $NATS_VERSION
MOD
cat > tools.go <<'GO'
//go:build tools

package tools

import _ "github.com/nats-io/nats-server/v2"
GO
go mod tidy -e >>"$buildlog" 2>&1 || die "go mod tidy (nats-server wrapper module in $work)" "$buildlog"
start=$SECONDS
go build -trimpath -ldflags "-s -w" -o "$NATS_BIN/nats-server" github.com/nats-io/nats-server/v2 >>"$buildlog" 2>&1 \
  || die "go build github.com/nats-io/nats-server/v2@$NATS_VERSION" "$buildlog"
log "nats-server $NATS_VERSION built in $((SECONDS - start))s into $NATS_BIN"
