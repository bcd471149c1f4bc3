#!/usr/bin/env bash
# Builds or resolves every cached binary of the stack at once (used to time a cold build).
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"
pids=()
for b in k8s etcd kwok kafka azurite elasticmq nats helm kueue; do bash "$HERE/build-$b.sh" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p" || die "a build failed (see the messages above)"; done
