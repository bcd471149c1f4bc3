# Shared settings for the local stack scripts: versions, cache and state paths, helpers.
# Sourced, never run. Everything binds to 127.0.0.1.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
ELASTICMQ_VERSION="${ELASTICMQ_VERSION:-1.7.1}"
NATS_VERSION="${NATS_VERSION:-v2.15.2}"
# Azurite: 3.35.0 is the newest release whose engines accept Node 20 (3.36.0 wants >= 21,
# 3.37.0 >= 22); Debian 13's nodejs is 20.
AZURITE_VERSION="${AZURITE_VERSION:-3.35.0}"
# KEDA is built only for `make bench-keda` (deploy/local/keda-run.sh), never for the tests.
KEDA_VERSION="${KEDA_VERSION:-v2.21.0}"
# Kueue (job queueing and quota) runs out of cluster in the stack (deploy/local/kueue.sh).
KUEUE_VERSION="${KUEUE_VERSION:-v0.17.0}"

# Built binaries and the Go/Maven caches live outside the work tree so that a fresh
# clone on the same machine reuses them; each build is keyed by its version.
JOBRUNNER_CACHE="${JOBRUNNER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobrunner}"
export GOMODCACHE="${GOMODCACHE_OVERRIDE:-$JOBRUNNER_CACHE/go/mod}"
export GOCACHE="${GOCACHE_OVERRIDE:-$JOBRUNNER_CACHE/go/build}"
export GOFLAGS="-buildvcs=false"
export CGO_ENABLED=0

# Runtime state (data dirs, logs, pids, kubeconfig, env file) for one stack.
JOBRUNNER_STATE="${JOBRUNNER_STATE:-/tmp/jobrunner-stack}"
LOG_DIR="$JOBRUNNER_STATE/logs"
PID_DIR="$JOBRUNNER_STATE/pids"
KUBECONFIG_PATH="$JOBRUNNER_STATE/kubeconfig"
ENV_FILE="$JOBRUNNER_STATE/stack.env"

K8S_BIN="$JOBRUNNER_CACHE/k8s-$K8S_VERSION/bin"
ETCD_BIN="$JOBRUNNER_CACHE/etcd-$ETCD_VERSION/bin"
KWOK_BIN="$JOBRUNNER_CACHE/kwok-$KWOK_VERSION/bin"
KAFKA_HOME="$JOBRUNNER_CACHE/kafka-$KAFKA_VERSION"
ELASTICMQ_HOME="$JOBRUNNER_CACHE/elasticmq-$ELASTICMQ_VERSION"
NATS_BIN="$JOBRUNNER_CACHE/nats-server-$NATS_VERSION/bin"
AZURITE_HOME="$JOBRUNNER_CACHE/azurite-$AZURITE_VERSION"
KEDA_HOME="$JOBRUNNER_CACHE/keda-$KEDA_VERSION"
KEDA_BIN="$KEDA_HOME/bin"
KUEUE_HOME="$JOBRUNNER_CACHE/kueue-$KUEUE_VERSION"
KUEUE_BIN="$KUEUE_HOME/bin"

APISERVER_PORT="${APISERVER_PORT:-6443}"
# The real node (node.sh): its name and taint, and its pod network's bridge. NODE_IP, the
# host's end of the bridge, is the node's InternalIP and the API server's advertised address.
REAL_NODE_NAME="${REAL_NODE_NAME:-jobrunner-node-0}"
REAL_NODE_TAINT="jobrunner.dev/real-node"
NODE_BRIDGE="${NODE_BRIDGE:-jr0}"
POD_CIDR="${POD_CIDR:-10.88.0.0/16}"
NODE_IP="${NODE_IP:-10.88.0.1}"
ETCD_PORT="${ETCD_PORT:-2379}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_SASL_PORT="${KAFKA_SASL_PORT:-9094}"
KAFKA_TLS_PORT="${KAFKA_TLS_PORT:-9095}"
KAFKA_SASL_USER="${KAFKA_SASL_USER:-jobrunner}"
KAFKA_SASL_PASSWORD="${KAFKA_SASL_PASSWORD:-local-stack-secret}"
RABBITMQ_PORT="${RABBITMQ_PORT:-5672}"
RABBITMQ_MGMT_PORT="${RABBITMQ_MGMT_PORT:-15672}"
ELASTICMQ_PORT="${ELASTICMQ_PORT:-9324}"
REDIS_PORT="${REDIS_PORT:-6379}"
REDIS_USER="${REDIS_USER:-jobrunner}"
REDIS_PASSWORD="${REDIS_PASSWORD:-local-stack-secret}"
NATS_PORT="${NATS_PORT:-4222}"
NATS_MONITOR_PORT="${NATS_MONITOR_PORT:-8222}"
MQTT_PORT="${MQTT_PORT:-1883}"
RABBITMQ_TLS_PORT="${RABBITMQ_TLS_PORT:-5671}"
RABBITMQ_USER="${RABBITMQ_USER:-jobrunner}"
RABBITMQ_PASSWORD="${RABBITMQ_PASSWORD:-local-rabbit-secret}"
AZURITE_QUEUE_PORT="${AZURITE_QUEUE_PORT:-10001}"
# Kueue's webhook server (the API server calls it by url), health probes and metrics.
KUEUE_WEBHOOK_PORT="${KUEUE_WEBHOOK_PORT:-9443}"
KUEUE_HEALTH_PORT="${KUEUE_HEALTH_PORT:-9444}"
KUEUE_METRICS_PORT="${KUEUE_METRICS_PORT:-9445}"
# Azurite's well-known development account (public, the same in every Azurite).
AZURITE_ACCOUNT=devstoreaccount1
AZURITE_KEY="Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

log() { printf '[stack %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# die COMMAND LOGFILE: say which command failed and where to look.
die() {
  log "FAILED: $1"
  if [[ -n "${2:-}" ]]; then
    log "log: $2"
    [[ -f "$2" ]] && tail -n 30 "$2" >&2 || true
  fi
  exit 1
}

# wait_for DESCRIPTION SECONDS COMMAND...: poll until COMMAND succeeds or time runs out.
wait_for() {
  local what="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then return 1; fi
    sleep 0.5
  done
}

pid_alive() { [[ -f "$PID_DIR/$1.pid" ]] && kill -0 "$(cat "$PID_DIR/$1.pid")" 2>/dev/null; }

# start_bg NAME LOG COMMAND...: start a daemon detached from this shell, remember its pid.
start_bg() {
  local name="$1" logfile="$2"; shift 2
  mkdir -p "$PID_DIR" "$LOG_DIR"
  setsid "$@" >>"$logfile" 2>&1 < /dev/null &
  echo $! > "$PID_DIR/$name.pid"
}

stop_pid() {
  local name="$1" pidfile="$PID_DIR/$1.pid"
  [[ -f "$pidfile" ]] || return 0
  local pid; pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}
