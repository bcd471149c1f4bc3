#!/usr/bin/env bash
# Restarts one broker of the local stack (stop, then stack-up.sh for that part), for the
# outage tests: sqs, redis, nats or mqtt; and kueue (its process only). Their data is on disk, so what they held
# survives, as it would on a real broker's restart.
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"
part="${1:-}"
case "$part" in
  sqs) name=elasticmq ;;
  redis|nats) name="$part" ;;
  mqtt) name=mosquitto ;;
  kueue) name=kueue ;;
  *) die "usage: stack-restart.sh sqs|redis|nats|mqtt|kueue" ;;
esac
log "restarting $name"
stop_pid "$name"
JOBRUNNER_STACK_WRITE_ENV=0 bash "$HERE/stack-up.sh" "$part" >/dev/null
