#!/usr/bin/env bash
# Stops every part of the local stack, in reverse order of start-up. Idempotent.
# With --purge also deletes its state ($JOBRUNNER_STATE); cached binaries are kept.
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"

if [[ -f "$JOBRUNNER_STATE/rabbitmq/rabbitmq.conf" ]] && "$HERE/rabbitmqctl.sh" status >/dev/null 2>&1; then
  log "stopping rabbitmq"; "$HERE/rabbitmqctl.sh" stop >/dev/null 2>&1 || true
fi
# The real node first: the kubelet, then every container it left (their shims outlive
# containerd), then containerd, then what its pods mounted under the node's directory.
NODE_DIR="$JOBRUNNER_STATE/node"
for part in kube-proxy kubelet; do
  if pid_alive "$part"; then log "stopping $part"; fi
  stop_pid "$part"
done
if pid_alive containerd; then
  ctr_=(ctr --address "$NODE_DIR/containerd/containerd.sock" -n k8s.io)
  for task in $("${ctr_[@]}" tasks ls -q 2>/dev/null); do "${ctr_[@]}" tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true; done
  log "stopping containerd"
fi
stop_pid containerd
pkill -KILL -f "containerd-shim-runc-v2 -namespace k8s.io -id .* -address $NODE_DIR/" 2>/dev/null || true
if [[ -d "$NODE_DIR" ]]; then
  # Deepest first; a busy mount is detached lazily.
  awk -v d="$NODE_DIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r \
    | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
fi
for part in mosquitto nats redis elasticmq azurite kafka rabbitmq kueue kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  if pid_alive "$part"; then log "stopping $part"; fi
  stop_pid "$part"
done
if [[ "${1:-}" == "--purge" ]]; then rm -rf "$JOBRUNNER_STATE"; log "removed $JOBRUNNER_STATE"; fi
log "stack down"
