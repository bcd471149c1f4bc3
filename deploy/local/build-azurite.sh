#!/usr/bin/env bash
# Azurite (Microsoft's Azure Storage emulator) from the npm registry, installed once per
# version under $JOBRUNNER_CACHE/azurite-<version>/ (outside the work tree). Needs Node
# and npm (install-system.sh brings Debian's).
source "$(dirname "$0")/common.sh"
[[ -x "$AZURITE_HOME/node_modules/.bin/azurite-queue" ]] && exit 0
command -v npm >/dev/null || die "npm not found (run deploy/local/install-system.sh)"
log "installing azurite $AZURITE_VERSION from npm"
mkdir -p "$AZURITE_HOME"
build_log="$JOBRUNNER_CACHE/azurite-$AZURITE_VERSION.build.log"
npm install --prefix "$AZURITE_HOME" --no-audit --no-fund --omit=dev --no-save \
  "azurite@$AZURITE_VERSION" >"$build_log" 2>&1 \
  || { rm -rf "$AZURITE_HOME"; die "npm install azurite@$AZURITE_VERSION" "$build_log"; }
log "azurite $AZURITE_VERSION installed in $AZURITE_HOME"
