#!/usr/bin/env bash
# Stops every part of the local stack, in reverse order of start-up. Idempotent.
# With --purge also deletes its state ($JOBRUNNER_STATE); cached binaries are kept.
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"

if [[ -f "$JOBRUNNER_STATE/rabbitmq/rabbitmq.conf" ]] && "$HERE/rabbitmqctl.sh" status >/dev/null 2>&1; then
  log "stopping rabbitmq"; "$HERE/rabbitmqctl.sh" stop >/dev/null 2>&1 || true
fi
for part in mosquitto nats redis elasticmq azurite kafka rabbitmq kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  if pid_alive "$part"; then log "stopping $part"; fi
  stop_pid "$part"
done
if [[ "${1:-}" == "--purge" ]]; then rm -rf "$JOBRUNNER_STATE"; log "removed $JOBRUNNER_STATE"; fi
log "stack down"
