#!/usr/bin/env bash
# Builds the KEDA operator $KEDA_VERSION from the Go module proxy, for `make bench-keda` only.
# KEDA's go.mod carries replace (and exclude) directives, which apply only in the main
# module, so `go install ...@version` refuses it; a wrapper module requires KEDA and copies
# those directives. Everything (source, binary, CRDs and this build's Go module and build
# caches) lives under $KEDA_HOME, outside the work tree, so a second run reuses it and
# `rm -rf $KEDA_HOME` removes every trace. Prints the binary's path.
source "$(dirname "$0")/common.sh"

export GOMODCACHE="${GOMODCACHE_OVERRIDE:-$KEDA_HOME/go/mod}"
export GOCACHE="${GOCACHE_OVERRIDE:-$KEDA_HOME/go/build}"
# -mod=mod: the wrapper's go.sum is filled as modules are downloaded. GOTOOLCHAIN=local:
# build with the machine's Go rather than fetch another toolchain.
export GOFLAGS="-buildvcs=false -mod=mod" GOTOOLCHAIN=local

operator="$KEDA_BIN/keda-operator"
crds="$KEDA_HOME/crds"
if [[ -x "$operator" && -n "$(ls "$crds"/*.yaml 2>/dev/null)" ]]; then
  log "keda $KEDA_VERSION cached in $KEDA_BIN"; echo "$operator"; exit 0
fi

work="$KEDA_HOME/src"
buildlog="$KEDA_HOME/build.log"
mkdir -p "$work" "$KEDA_BIN" "$crds"
log "building keda $KEDA_VERSION in $work; log: $buildlog"
cd "$work"

info="$(go mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" 2>>"$buildlog")" \
  || die "go mod download github.com/kedacore/keda/v2@$KEDA_VERSION" "$buildlog"
upstream_mod="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])' <<<"$info")"

# The wrapper: KEDA's go version, a require of KEDA, and KEDA's replace and exclude
# directives read through `go mod edit -json` (block or single-line forms alike).
cat > go.mod <<MOD
module jobrunner.local/keda-build

go $(go mod edit -json "$upstream_mod" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Go"])')

require github.com/kedacore/keda/v2 $KEDA_VERSION
MOD
mapfile -t directives < <(go mod edit -json "$upstream_mod" | python3 -c '
import json, sys
mod = json.load(sys.stdin)
def at(m):
    return m["Path"] + ("@" + m["Version"] if m.get("Version") else "")
for r in mod.get("Replace") or []:
    print("-replace=" + at(r["Old"]) + "=" + at(r["New"]))
for e in mod.get("Exclude") or []:
    print("-exclude=" + at(e))
')
(( ${#directives[@]} )) && go mod edit "${directives[@]}"
log "wrapper module: ${#directives[@]} directives copied from KEDA's go.mod"
cat > tools.go <<'GO'
//go:build tools

package tools

import _ "github.com/kedacore/keda/v2/cmd/operator"
GO

start=$SECONDS
go mod download all >>"$buildlog" 2>&1 || die "go mod download all (keda wrapper module in $work)" "$buildlog"
log "keda modules downloaded in $((SECONDS - start))s"

start=$SECONDS
# The version KEDA's own release build stamps (it labels Jobs app.kubernetes.io/version).
ldflags="-s -w -X=github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v}"
go build -trimpath -ldflags "$ldflags" -o "$operator.tmp" github.com/kedacore/keda/v2/cmd/operator \
  >>"$buildlog" 2>&1 || die "go build github.com/kedacore/keda/v2/cmd/operator@$KEDA_VERSION" "$buildlog"
bash "$(dirname "$0")/keda-crds.sh" >/dev/null || die "keda-crds.sh (KEDA's CRDs from its module)"
mv "$operator.tmp" "$operator"
log "keda $KEDA_VERSION built in $((SECONDS - start))s into $KEDA_BIN"
echo "$operator"
