#!/usr/bin/env bash
# Builds etcd $ETCD_VERSION from the Go module go.etcd.io/etcd/server/v3 (its main package)
# through a wrapper module: Debian's and PyPI's etcd are too old for a current
# kube-apiserver (watch progress requests). Output is cached by version.
source "$(dirname "$0")/common.sh"

if [[ -x "$ETCD_BIN/etcd" ]]; then log "etcd $ETCD_VERSION cached in $ETCD_BIN"; exit 0; fi
work="$JOBRUNNER_CACHE/etcd-$ETCD_VERSION/src"
buildlog="$JOBRUNNER_CACHE/etcd-$ETCD_VERSION/build.log"
mkdir -p "$work" "$ETCD_BIN"
cd "$work"
cat > go.mod <<MOD
module jobrunner.local/etcd-build

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
cat > tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
go mod tidy -e >>"$buildlog" 2>&1 || die "go mod tidy (etcd wrapper module in $work)" "$buildlog"
start=$SECONDS
go build -trimpath -ldflags "-s -w" -o "$ETCD_BIN/etcd" go.etcd.io/etcd/server/v3 >>"$buildlog" 2>&1 \
  || die "go build go.etcd.io/etcd/server/v3@$ETCD_VERSION" "$buildlog"
log "etcd $ETCD_VERSION built in $((SECONDS - start))s into $ETCD_BIN"
