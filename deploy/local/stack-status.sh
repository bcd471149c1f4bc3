#!/usr/bin/env bash
# Health of each part of the local stack, one line each; exits non-zero if any is down.
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"
set +e
PKI="$JOBRUNNER_STATE/pki"
failed=0
check() {
  local name="$1" detail="$2"; shift 2
  if "$@" >/dev/null 2>&1; then
    printf '  %-24s up    %s\n' "$name" "$detail"
  else
    printf '  %-24s DOWN  %s (log: %s)\n' "$name" "$detail" "$LOG_DIR/$name.log"; failed=1
  fi
}
kget() { curl -sf --cacert "$PKI/ca.crt" -H "Authorization: Bearer $(cat "$PKI/admin.token" 2>/dev/null)" "https://127.0.0.1:$APISERVER_PORT$1"; }
node_ready() { kget "/api/v1/nodes/$1" | python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if any(c["type"]=="Ready" and c["status"]=="True" for c in n["status"]["conditions"]) else 1)'; }
rss() {
  local total=0 pid
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler kwok kueue containerd kubelet kube-proxy kafka azurite elasticmq redis nats mosquitto; do
    [[ -f "$PID_DIR/$name.pid" ]] || continue
    pid="$(cat "$PID_DIR/$name.pid")"
    total=$((total + $(awk '/VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
  done
  # RabbitMQ runs as a beam.smp tree started from its script.
  for pid in $(pgrep -f 'beam.smp.*jobrunner@localhost'); do
    total=$((total + $(awk '/VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
  done
  echo $((total / 1024))
}

echo "jobrunner local stack ($JOBRUNNER_STATE)"
check etcd "http://127.0.0.1:$ETCD_PORT" curl -sf "http://127.0.0.1:$ETCD_PORT/health"
check kube-apiserver "https://127.0.0.1:$APISERVER_PORT" kget /readyz
check kube-controller-manager "https://127.0.0.1:10257" curl -skf https://127.0.0.1:10257/healthz
check kube-scheduler "https://127.0.0.1:10259" curl -skf https://127.0.0.1:10259/healthz
check kwok "node kwok-node-0 Ready" node_ready kwok-node-0
check kueue "webhook https://127.0.0.1:$KUEUE_WEBHOOK_PORT, readyz http://127.0.0.1:$KUEUE_HEALTH_PORT" \
  curl -sf "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz"
check containerd "$JOBRUNNER_STATE/node/containerd/containerd.sock" ctr --address "$JOBRUNNER_STATE/node/containerd/containerd.sock" version
check kubelet "node $REAL_NODE_NAME Ready (real containers)" node_ready "$REAL_NODE_NAME"
check kube-proxy "http://127.0.0.1:10256" curl -sf http://127.0.0.1:10256/healthz
check rabbitmq "amqp://127.0.0.1:$RABBITMQ_PORT, http://127.0.0.1:$RABBITMQ_MGMT_PORT" \
  curl -sf -u guest:guest "http://127.0.0.1:$RABBITMQ_MGMT_PORT/api/overview"
check kafka "127.0.0.1:$KAFKA_PORT" bash -c "exec 3<>/dev/tcp/127.0.0.1/$KAFKA_PORT"
check azurite "http://127.0.0.1:$AZURITE_QUEUE_PORT/$AZURITE_ACCOUNT (queue)" \
  curl -s -o /dev/null "http://127.0.0.1:$AZURITE_QUEUE_PORT/$AZURITE_ACCOUNT?comp=list"
check elasticmq "http://127.0.0.1:$ELASTICMQ_PORT (SQS)" curl -sf "http://127.0.0.1:$ELASTICMQ_PORT/?Action=ListQueues"
check redis "127.0.0.1:$REDIS_PORT" bash -c "redis-cli -p $REDIS_PORT ping | grep -q PONG"
check nats "nats://127.0.0.1:$NATS_PORT, http://127.0.0.1:$NATS_MONITOR_PORT" curl -sf "http://127.0.0.1:$NATS_MONITOR_PORT/healthz?js-enabled-only=true"
check mosquitto "mqtt://127.0.0.1:$MQTT_PORT" mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t '$SYS/broker/uptime' -C 1 -W 3
echo "  kubeconfig: $KUBECONFIG_PATH"
echo "  resident memory of the stack: $(rss) MiB"
exit $failed
