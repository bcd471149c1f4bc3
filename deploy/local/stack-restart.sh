#!/usr/bin/env bash
# Restarts one broker of the local stack (stop, then stack-up.sh for that part), for the
# outage tests: sqs, redis, nats or mqtt; and kueue (its process only). Their data is on disk, so what they held
# survives, as it would on a real broker's restart. worker-apiserver restarts only the
# worker cluster's API server (worker-cluster.sh); its etcd keeps what it held.
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"
part="${1:-}"
case "$part" in
  sqs) name=elasticmq ;;
  redis|nats) name="$part" ;;
  mqtt) name=mosquitto ;;
  kueue) name=kueue ;;
  # kube-apiserver drains at once but then lingers until SIGKILL (10 s on this machine):
  # 2 s, so the outage is a few seconds, as a crash-and-restart would be.
  worker-apiserver) name=worker-kube-apiserver; part=worker; grace=2 ;;
  *) die "usage: stack-restart.sh sqs|redis|nats|mqtt|kueue|worker-apiserver" ;;
esac
log "restarting $name"
stop_pid "$name" "${grace:-10}"
JOBRUNNER_STACK_WRITE_ENV=0 bash "$HERE/stack-up.sh" "$part" >/dev/null
