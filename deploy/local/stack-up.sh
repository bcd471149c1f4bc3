#!/usr/bin/env bash
# Brings up the real services jobrunner's tests run against, all on 127.0.0.1:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK with one fake node,
#   a real node (containerd, runc, kubelet, kube-proxy; see node.sh) whose pods reach the
#   API server and the brokers through its bridge,
#   RabbitMQ (with the management plugin), Apache Kafka (KRaft, one node), Azurite
#   (the Azure Storage emulator, queue service only), ElasticMQ (SQS), Redis, NATS with
#   JetStream and Mosquitto (MQTT 5); Kueue, out of cluster (kueue.sh).
# Idempotent: a part that is already healthy is left alone. Binaries are built once and
# cached by version (see build-*.sh). Writes $ENV_FILE for the tests and the demo.
#
# Usage: stack-up.sh [all|k8s|kueue|node|rabbitmq|kafka|azurite|sqs|redis|nats|mqtt]...
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/node.sh"
source "$HERE/kueue.sh"

PKI="$JOBRUNNER_STATE/pki"
TOKEN_FILE="$PKI/admin.token"
APISERVER_URL="https://127.0.0.1:$APISERVER_PORT"
mkdir -p "$LOG_DIR" "$PID_DIR" "$PKI"

admin_token() { cat "$TOKEN_FILE"; }
kcurl() { curl -sS --fail --cacert "$PKI/ca.crt" -H "Authorization: Bearer $(admin_token)" "$@"; }

# ---------------------------------------------------------------- Kubernetes
start_etcd() {
  if curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1; then log "etcd already healthy"; return; fi
  log "starting etcd $ETCD_VERSION"
  start_bg etcd "$LOG_DIR/etcd.log" "$ETCD_BIN/etcd" \
    --name jobrunner --data-dir "$JOBRUNNER_STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "jobrunner=http://127.0.0.1:$((ETCD_PORT + 1))" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn
  wait_for etcd 60 curl -sf "http://127.0.0.1:$ETCD_PORT/health" \
    || die "etcd --data-dir $JOBRUNNER_STATE/etcd (no /health within 60s)" "$LOG_DIR/etcd.log"
}

make_pki() {
  [[ -f "$PKI/sa.key" ]] || {
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null || die "openssl genrsa (service-account key)"
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null || die "openssl rsa -pubout"
  }
  [[ -f "$TOKEN_FILE" ]] || {
    openssl rand -hex 24 > "$TOKEN_FILE"
    # token,user,uid,"group1,group2": system:masters makes this an administrator.
    printf '%s,jobrunner-admin,jobrunner-admin,"system:masters"\n' "$(admin_token)" > "$PKI/tokens.csv"
  }
  # The stack's CA signs every certificate: the API server's (trusted by the kubeconfig
  # and, through kube-root-ca.crt, by every pod), the real node's client and serving
  # certificates, and the API server's client for the kubelet.
  [[ -f "$PKI/ca.key" ]] || {
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 3650 \
      -subj /CN=jobrunner-local-ca >>"$LOG_DIR/pki.log" 2>&1 || die "openssl req -x509 (the stack's CA)" "$LOG_DIR/pki.log"
    chmod 600 "$PKI/ca.key"
  }
  issue_cert apiserver "/CN=kube-apiserver" \
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # The chain, so that whoever takes this file as its CA (older scripts did) still verifies.
  (( $(grep -c 'BEGIN CERTIFICATE' "$PKI/apiserver.crt") > 1 )) || cat "$PKI/ca.crt" >> "$PKI/apiserver.crt"
  issue_cert apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client" \
    'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
}

write_kubeconfig() {
  local ca; ca="$(base64 -w0 < "$PKI/ca.crt")"
  cat > "$KUBECONFIG_PATH" <<KC
apiVersion: v1
kind: Config
clusters:
- name: jobrunner-local
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $ca
users:
- name: jobrunner-admin
  user:
    token: $(admin_token)
contexts:
- name: jobrunner-local
  context: {cluster: jobrunner-local, user: jobrunner-admin, namespace: default}
current-context: jobrunner-local
KC
  chmod 600 "$KUBECONFIG_PATH"
}

apiserver_ready() { kcurl "$APISERVER_URL/readyz" >/dev/null 2>&1; }

# running_with NAME ARGS...: the daemon NAME runs, started with exactly these arguments
# (a stack-up that changed them restarts it).
running_with() {
  local name="$1"; shift
  pid_alive "$name" && [[ -f "$PID_DIR/$name.args" && "$(cat "$PID_DIR/$name.args")" == "$*" ]]
}
remember_args() { local name="$1"; shift; echo "$*" > "$PID_DIR/$name.args"; }

start_apiserver() {
  make_pki
  # Every address, so the real node's pods reach it through the bridge (node_network's
  # JOBRUNNER-LOCAL chain keeps it to this machine); the advertised address is the
  # bridge's, which the `kubernetes` Service's endpoint then names (a loopback address may
  # not be an endpoint). Node,RBAC and NodeRestriction: the real node's kubelet may touch
  # only its own Node and its pods.
  local args=(
    --etcd-servers "http://127.0.0.1:$ETCD_PORT"
    --bind-address 0.0.0.0 --advertise-address "$NODE_IP" --secure-port "$APISERVER_PORT"
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key"
    --client-ca-file "$PKI/ca.crt" --token-auth-file "$PKI/tokens.csv"
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt"
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key"
    --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP
    --service-account-issuer https://kubernetes.default.svc.cluster.local
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key"
    --service-cluster-ip-range 10.96.0.0/16
    --allow-privileged=true --profiling=false --v 1
  )
  if running_with kube-apiserver "${args[@]}" && apiserver_ready; then
    log "kube-apiserver already ready"; write_kubeconfig; return
  fi
  if pid_alive kube-apiserver || [[ -f "$PID_DIR/kube-apiserver.pid" ]]; then
    # Its flags or certificates changed: what talks to it restarts with it.
    log "restarting the control plane with new settings"
    stop_pid kwok; stop_pid kube-scheduler; stop_pid kube-controller-manager; stop_pid kube-apiserver
  fi
  log "starting kube-apiserver $K8S_VERSION"
  start_bg kube-apiserver "$LOG_DIR/kube-apiserver.log" "$K8S_BIN/kube-apiserver" "${args[@]}"
  remember_args kube-apiserver "${args[@]}"
  write_kubeconfig
  wait_for kube-apiserver 120 apiserver_ready \
    || die "kube-apiserver (no /readyz within 120s)" "$LOG_DIR/kube-apiserver.log"
}

start_controller_manager() {
  if pid_alive kube-controller-manager && curl -skf https://127.0.0.1:10257/healthz >/dev/null 2>&1; then
    log "kube-controller-manager already healthy"; return
  fi
  stop_pid kube-controller-manager
  log "starting kube-controller-manager"
  # The default controller set includes job, ttl-after-finished, garbage collection and
  # the service-account controller that creates each namespace's `default` account.
  start_bg kube-controller-manager "$LOG_DIR/kube-controller-manager.log" "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$KUBECONFIG_PATH" --leader-elect=false --bind-address 127.0.0.1 \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=false --concurrent-job-syncs 20 --concurrent-gc-syncs 20 \
    --kube-api-qps 200 --kube-api-burst 400 --v 1
  wait_for kube-controller-manager 60 curl -skf https://127.0.0.1:10257/healthz \
    || die "kube-controller-manager (no /healthz within 60s)" "$LOG_DIR/kube-controller-manager.log"
}

start_scheduler() {
  if pid_alive kube-scheduler && curl -skf https://127.0.0.1:10259/healthz >/dev/null 2>&1; then
    log "kube-scheduler already healthy"; return
  fi
  stop_pid kube-scheduler
  log "starting kube-scheduler"
  start_bg kube-scheduler "$LOG_DIR/kube-scheduler.log" "$K8S_BIN/kube-scheduler" \
    --kubeconfig "$KUBECONFIG_PATH" --leader-elect=false --bind-address 127.0.0.1 \
    --kube-api-qps 200 --kube-api-burst 400 --v 1
  wait_for kube-scheduler 60 curl -skf https://127.0.0.1:10259/healthz \
    || die "kube-scheduler (no /healthz within 60s)" "$LOG_DIR/kube-scheduler.log"
}

node_ready() {
  kcurl "$APISERVER_URL/api/v1/nodes/kwok-node-0" 2>/dev/null \
    | python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if any(c["type"]=="Ready" and c["status"]=="True" for c in n.get("status",{}).get("conditions",[])) else 1)'
}

start_kwok() {
  local stages="$GOMODCACHE/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
  if ! pid_alive kwok; then
    [[ -d "$stages" ]] || die "kwok stages not found in $stages (run build-kwok.sh)"
    log "starting kwok $KWOK_VERSION"
    # KWOK's own stages for nodes and for pod start-up/deletion; ours decide how a Job's
    # pod ends (see kwok/job-pod-stages.yaml). pod-delete lets GC and TTL deletions finish
    # without a kubelet.
    start_bg kwok "$LOG_DIR/kwok.log" "$KWOK_BIN/kwok" \
      --kubeconfig "$KUBECONFIG_PATH" \
      --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
      --node-lease-duration-seconds 40 --server-address 127.0.0.1:10247 \
      --config "$stages/node/fast/node-initialize.yaml" \
      --config "$stages/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
      --config "$stages/pod/fast/pod-ready.yaml" \
      --config "$stages/pod/fast/pod-delete.yaml" \
      --config "$HERE/kwok/job-pod-stages.yaml"
  fi
  local code
  code="$(curl -s -o /dev/null -w '%{http_code}' --cacert "$PKI/ca.crt" -H "Authorization: Bearer $(admin_token)" \
    -H 'Content-Type: application/json' -X POST --data @"$HERE/kwok/node.json" "$APISERVER_URL/api/v1/nodes")"
  [[ "$code" == 201 || "$code" == 409 ]] || die "POST /api/v1/nodes (kwok-node-0) answered HTTP $code"
  wait_for "kwok node" 60 node_ready || die "kwok (node kwok-node-0 not Ready within 60s)" "$LOG_DIR/kwok.log"
  log "node kwok-node-0 Ready"
}

up_k8s() {
  # The three builds share nothing but the module cache; run them side by side so the
  # downloads of one overlap the compiling of another.
  local pids=() p
  bash "$HERE/build-k8s.sh" & pids+=($!)
  bash "$HERE/build-etcd.sh" & pids+=($!)
  bash "$HERE/build-kwok.sh" & pids+=($!)
  for p in "${pids[@]}"; do wait "$p" || die "building the control plane (see the messages above)"; done
  node_packages; node_network
  start_etcd; start_apiserver; start_controller_manager; start_scheduler; start_kwok
  up_node
}

# ---------------------------------------------------------------- RabbitMQ
RMQ_DIR="$JOBRUNNER_STATE/rabbitmq"
rmq_env() {
  # Run the server directly (not Debian's su wrapper, which drops the environment) with
  # all state under $RMQ_DIR; root's Erlang cookie is shared with rabbitmqctl.
  export RABBITMQ_NODENAME="jobrunner@localhost" RABBITMQ_USE_LONGNAME=false \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$RABBITMQ_PORT" \
    RABBITMQ_DIST_PORT=$((RABBITMQ_PORT + 20000)) ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia" RABBITMQ_LOG_BASE="$LOG_DIR/rabbitmq" \
    RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins" \
    RABBITMQ_PID_FILE="$RMQ_DIR/rabbitmq.pid" RABBITMQ_PLUGINS_EXPAND_DIR="$RMQ_DIR/plugins-expand"
}
rmqctl() { rmq_env; /usr/lib/rabbitmq/bin/rabbitmqctl -n jobrunner@localhost "$@"; }

make_rabbitmq_tls() {
  # The server certificate is signed by the local CA the Kafka TLS listener uses.
  make_kafka_tls
  local dir="$RMQ_DIR/tls" ca="$KAFKA_DIR/tls"
  [[ -f "$dir/server.crt" ]] && return
  mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > server.ext
    openssl x509 -req -in server.csr -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -CAcreateserial \
      -out server.crt -days 3650 -extfile server.ext
    chmod 644 server.key
  ) >>"$LOG_DIR/rabbitmq-tls.log" 2>&1 || die "openssl (RabbitMQ TLS certificates in $dir)" "$LOG_DIR/rabbitmq-tls.log"
}

rabbitmq_tls_up() { (exec 3<>"/dev/tcp/127.0.0.1/$RABBITMQ_TLS_PORT") 2>/dev/null; }

up_rabbitmq() {
  [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || bash "$HERE/install-system.sh"
  mkdir -p "$RMQ_DIR" "$LOG_DIR/rabbitmq" "$KAFKA_DIR"
  node_packages; node_network   # the bridge address it listens on for the real node's pods
  make_rabbitmq_tls
  if rmqctl status >/dev/null 2>&1; then
    if rabbitmq_tls_up && grep -q "^listeners.tcp.2 = $NODE_IP:" "$RMQ_DIR/rabbitmq.conf"; then
      log "rabbitmq already running"; rabbitmq_user; return
    fi
    # Started by an older stack-up without the TLS listener or the one the real node's
    # pods reach: restart it with this config.
    log "restarting rabbitmq to add its listeners"
    rmqctl stop >/dev/null 2>&1 || true
    stop_pid rabbitmq
  fi
  cat > "$RMQ_DIR/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:$RABBITMQ_PORT
# The real node's pods (the operator installed by Helm) reach the broker at the host's end
# of the pod bridge; the address exists only on this machine.
listeners.tcp.2 = $NODE_IP:$RABBITMQ_PORT
listeners.ssl.1 = 127.0.0.1:$RABBITMQ_TLS_PORT
ssl_options.cacertfile = $KAFKA_DIR/tls/ca.crt
ssl_options.certfile = $RMQ_DIR/tls/server.crt
ssl_options.keyfile = $RMQ_DIR/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
management.tcp.ip = 127.0.0.1
management.tcp.port = $RABBITMQ_MGMT_PORT
# RabbitMQ's default (30 min); tests shorten it at run time with rabbitmqctl eval.
consumer_timeout = ${RABBITMQ_CONSUMER_TIMEOUT_MS:-1800000}
vm_memory_high_watermark.relative = 0.2
CONF
  echo '[rabbitmq_management].' > "$RMQ_DIR/enabled_plugins"
  log "starting rabbitmq-server"
  rmq_env
  start_bg rabbitmq "$LOG_DIR/rabbitmq-server.log" /usr/lib/rabbitmq/bin/rabbitmq-server
  wait_for rabbitmq 120 rmqctl await_startup \
    || die "rabbitmq-server (await_startup failed within 120s)" "$LOG_DIR/rabbitmq-server.log"
  wait_for "rabbitmq management" 60 curl -sf -u guest:guest "http://127.0.0.1:$RABBITMQ_MGMT_PORT/api/overview" \
    || die "rabbitmq management plugin (no /api/overview within 60s)" "$LOG_DIR/rabbitmq-server.log"
  wait_for "rabbitmq TLS listener" 30 rabbitmq_tls_up \
    || die "rabbitmq TLS listener on :$RABBITMQ_TLS_PORT" "$LOG_DIR/rabbitmq-server.log"
  rabbitmq_user
}

# A user with a real password beside guest, as production brokers have.
rabbitmq_user() {
  if ! rmqctl list_users 2>/dev/null | grep -q "^$RABBITMQ_USER\b"; then
    rmqctl add_user "$RABBITMQ_USER" "$RABBITMQ_PASSWORD" >/dev/null \
      || die "rabbitmqctl add_user $RABBITMQ_USER" "$LOG_DIR/rabbitmq-server.log"
  fi
  rmqctl set_permissions -p / "$RABBITMQ_USER" ".*" ".*" ".*" >/dev/null \
    || die "rabbitmqctl set_permissions $RABBITMQ_USER" "$LOG_DIR/rabbitmq-server.log"
  rmqctl set_user_tags "$RABBITMQ_USER" management >/dev/null || true
}

# ---------------------------------------------------------------- Kafka
KAFKA_DIR="$JOBRUNNER_STATE/kafka"
kafka_java() { java -Xms128m -Xmx512m -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" -cp "$KAFKA_HOME/libs/*" "$@"; }
kafka_ready() { (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null && grep -q "Kafka Server started" "$LOG_DIR/kafka.log" 2>/dev/null; }

make_kafka_tls() {
  local dir="$KAFKA_DIR/tls"
  [[ -f "$dir/server.pem" ]] && return
  mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj /CN=jobrunner-local-ca
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt \
      -days 3650 -extfile server.ext
    cat server.key server.crt > server.pem
  ) >>"$LOG_DIR/kafka-tls.log" 2>&1 || die "openssl (Kafka TLS certificates in $dir)" "$LOG_DIR/kafka-tls.log"
}

up_kafka() {
  bash "$HERE/build-kafka.sh"
  if pid_alive kafka && kafka_ready; then log "kafka already running"; return; fi
  stop_pid kafka
  mkdir -p "$KAFKA_DIR"
  cat > "$KAFKA_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SASL_PLAINTEXT://127.0.0.1:$KAFKA_SASL_PORT,SSL://127.0.0.1:$KAFKA_TLS_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_PLAINTEXT://127.0.0.1:$KAFKA_SASL_PORT,SSL://127.0.0.1:$KAFKA_TLS_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL
# A TLS listener (PEM key and chain from a local CA) so authenticationRef's tls/ca is tested.
ssl.keystore.type=PEM
ssl.keystore.location=$KAFKA_DIR/tls/server.pem
# A SASL/PLAIN listener so authenticationRef credentials are tested for real.
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$KAFKA_SASL_USER="$KAFKA_SASL_PASSWORD";
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DIR/data
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
PROPS
  cat > "$KAFKA_DIR/log4j2.properties" <<'L4J'
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
L4J
  make_kafka_tls
  if [[ ! -f "$KAFKA_DIR/data/meta.properties" ]]; then
    local cluster_id
    cluster_id="$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$LOG_DIR/kafka-format.log")" \
      || die "kafka.tools.StorageTool random-uuid" "$LOG_DIR/kafka-format.log"
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_DIR/server.properties" \
      >>"$LOG_DIR/kafka-format.log" 2>&1 || die "kafka.tools.StorageTool format" "$LOG_DIR/kafka-format.log"
  fi
  log "starting kafka $KAFKA_VERSION"
  : > "$LOG_DIR/kafka.log"
  start_bg kafka "$LOG_DIR/kafka.log" java -Xms128m -Xmx512m -XX:+UseG1GC \
    -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" -cp "$KAFKA_HOME/libs/*" \
    kafka.Kafka "$KAFKA_DIR/server.properties"
  wait_for kafka 120 kafka_ready || die "kafka.Kafka (not started within 120s)" "$LOG_DIR/kafka.log"
}

# ---------------------------------------------------------------- ElasticMQ (SQS)
SQS_DIR="$JOBRUNNER_STATE/elasticmq"
sqs_ready() { curl -sf "http://127.0.0.1:$ELASTICMQ_PORT/?Action=ListQueues" >/dev/null; }

up_sqs() {
  bash "$HERE/build-elasticmq.sh"
  if pid_alive elasticmq && sqs_ready; then log "elasticmq already running"; return; fi
  stop_pid elasticmq
  mkdir -p "$SQS_DIR"
  # Queues and messages are kept on disk (H2), so a restart loses nothing, as on SQS.
  cat > "$SQS_DIR/elasticmq.conf" <<CONF
include classpath("application.conf")
node-address { protocol = http, host = 127.0.0.1, port = $ELASTICMQ_PORT, context-path = "" }
rest-sqs { enabled = true, bind-port = $ELASTICMQ_PORT, bind-hostname = "127.0.0.1", sqs-limits = strict }
rest-stats { enabled = false }
generate-node-address = false
queues-storage { enabled = true, path = "$SQS_DIR/queues.conf" }
messages-storage { enabled = true, uri = "jdbc:h2:$SQS_DIR/messages" }
aws { region = us-east-1, accountId = 000000000000 }
CONF
  log "starting elasticmq $ELASTICMQ_VERSION"
  start_bg elasticmq "$LOG_DIR/elasticmq.log" java -Xms64m -Xmx256m -XX:+UseSerialGC \
    -Dconfig.file="$SQS_DIR/elasticmq.conf" -cp "$ELASTICMQ_HOME/libs/*" org.elasticmq.server.Main
  wait_for elasticmq 120 sqs_ready || die "org.elasticmq.server.Main (no answer on :$ELASTICMQ_PORT within 120s)" "$LOG_DIR/elasticmq.log"
}

# ---------------------------------------------------------------- Redis
REDIS_DIR="$JOBRUNNER_STATE/redis"
up_redis() {
  [[ -x /usr/bin/redis-server ]] || bash "$HERE/install-system.sh"
  if pid_alive redis && redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then log "redis already running"; return; fi
  stop_pid redis
  mkdir -p "$REDIS_DIR"
  log "starting redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')"
  # Append-only file, fsync'd on every write: an XACK or XADD that returned survives a
  # restart (Redis' default snapshotting would lose the last minutes).
  # Besides the open default user, an ACL user with a password, so TriggerAuthentication
  # credentials are tested for real.
  start_bg redis "$LOG_DIR/redis.log" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" \
    --dir "$REDIS_DIR" --appendonly yes --appendfsync always --save "" --daemonize no \
    --protected-mode yes --loglevel notice \
    --user "$REDIS_USER" on ">$REDIS_PASSWORD" "~*" "&*" "+@all"
  wait_for redis 60 bash -c "redis-cli -p $REDIS_PORT ping | grep -q PONG" \
    || die "redis-server (no PONG within 60s)" "$LOG_DIR/redis.log"
}

# ---------------------------------------------------------------- NATS JetStream
NATS_DIR="$JOBRUNNER_STATE/nats"
nats_ready() { curl -sf "http://127.0.0.1:$NATS_MONITOR_PORT/healthz?js-enabled-only=true" >/dev/null; }
up_nats() {
  bash "$HERE/build-nats.sh"
  if pid_alive nats && nats_ready; then log "nats-server already running"; return; fi
  stop_pid nats
  mkdir -p "$NATS_DIR"
  log "starting nats-server $NATS_VERSION with JetStream"
  start_bg nats "$LOG_DIR/nats.log" "$NATS_BIN/nats-server" -a 127.0.0.1 -p "$NATS_PORT" \
    -m "$NATS_MONITOR_PORT" -js -sd "$NATS_DIR" -n jobrunner-local
  wait_for nats 60 nats_ready || die "nats-server -js (no /healthz within 60s)" "$LOG_DIR/nats.log"
}

# ---------------------------------------------------------------- Mosquitto (MQTT 5)
MQTT_DIR="$JOBRUNNER_STATE/mosquitto"
mqtt_ready() { mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t '$SYS/broker/uptime' -C 1 -W 3; }
up_mqtt() {
  [[ -x /usr/sbin/mosquitto ]] && command -v mosquitto_sub >/dev/null || bash "$HERE/install-system.sh"
  if pid_alive mosquitto && mqtt_ready >/dev/null 2>&1; then log "mosquitto already running"; return; fi
  stop_pid mosquitto
  mkdir -p "$MQTT_DIR"
  # Persistent sessions and their queued QoS 1 messages are saved after every change
  # (autosave_on_changes with a count of 1), so a restart keeps what a session held;
  # Mosquitto's default saves every 30 minutes only.
  cat > "$MQTT_DIR/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
user root
persistence true
persistence_location $MQTT_DIR/
autosave_on_changes true
autosave_interval 1
max_queued_messages 100000
max_inflight_messages 0
log_dest stdout
log_type error
log_type warning
log_type notice
connection_messages true
CONF
  log "starting mosquitto $(mosquitto -h 2>/dev/null | head -1 | awk '{print $3}')"
  start_bg mosquitto "$LOG_DIR/mosquitto.log" /usr/sbin/mosquitto -c "$MQTT_DIR/mosquitto.conf"
  wait_for mosquitto 60 mqtt_ready || die "mosquitto -c $MQTT_DIR/mosquitto.conf (no \$SYS answer within 60s)" "$LOG_DIR/mosquitto.log"
}

# ---------------------------------------------------------------- Azurite (queue service)
AZURITE_DIR="$JOBRUNNER_STATE/azurite"
AZURITE_CONNECTION="DefaultEndpointsProtocol=http;AccountName=$AZURITE_ACCOUNT;AccountKey=$AZURITE_KEY;QueueEndpoint=http://127.0.0.1:$AZURITE_QUEUE_PORT/$AZURITE_ACCOUNT;"
# Any HTTP answer from the queue endpoint means it serves (an anonymous request gets 4xx).
azurite_ready() { curl -s -o /dev/null "http://127.0.0.1:$AZURITE_QUEUE_PORT/$AZURITE_ACCOUNT?comp=list"; }

up_azurite() {
  bash "$HERE/build-azurite.sh"
  if pid_alive azurite && azurite_ready; then log "azurite already running"; return; fi
  stop_pid azurite
  mkdir -p "$AZURITE_DIR"
  log "starting azurite $AZURITE_VERSION (queue service)"
  # --skipApiVersionCheck: the Python SDK sends a newer x-ms-version than this Azurite's
  # baseline (2025-11-05) and would get 400 InvalidHeaderValue otherwise.
  start_bg azurite "$LOG_DIR/azurite.log" node "$AZURITE_HOME/node_modules/azurite/dist/src/queue/main.js" \
    --queueHost 127.0.0.1 --queuePort "$AZURITE_QUEUE_PORT" --location "$AZURITE_DIR" \
    --skipApiVersionCheck --disableTelemetry
  wait_for azurite 60 azurite_ready || die "azurite-queue (no answer on :$AZURITE_QUEUE_PORT within 60s)" "$LOG_DIR/azurite.log"
}
azurite_env() {
  # Quoted: the value holds ';', and the file is also sourced by a shell (make test).
  echo "JOBRUNNER_TEST_AZURE_STORAGE_CONNECTION_STRING='$AZURITE_CONNECTION'"
}

write_env() {
  local fresh="$ENV_FILE.new"
  cat > "$fresh" <<ENV
# Written by deploy/local/stack-up.sh; read by the test fixtures and the demo.
JOBRUNNER_TEST_KUBECONFIG=$KUBECONFIG_PATH
JOBRUNNER_TEST_KUBECTL=$K8S_BIN/kubectl
JOBRUNNER_TEST_RABBITMQ_URL=amqp://guest:guest@127.0.0.1:$RABBITMQ_PORT/
JOBRUNNER_TEST_RABBITMQ_POD_URL=amqp://$RABBITMQ_USER:$RABBITMQ_PASSWORD@$NODE_IP:$RABBITMQ_PORT/
JOBRUNNER_TEST_RABBITMQ_MANAGEMENT_URL=http://guest:guest@127.0.0.1:$RABBITMQ_MGMT_PORT/
JOBRUNNER_TEST_RABBITMQCTL=$HERE/rabbitmqctl.sh
JOBRUNNER_TEST_RABBITMQ_TLS_URL=amqps://$RABBITMQ_USER:$RABBITMQ_PASSWORD@127.0.0.1:$RABBITMQ_TLS_PORT/
JOBRUNNER_TEST_RABBITMQ_TLS_CA=$KAFKA_DIR/tls/ca.crt
JOBRUNNER_TEST_RABBITMQ_USER=$RABBITMQ_USER
JOBRUNNER_TEST_RABBITMQ_PASSWORD=$RABBITMQ_PASSWORD
JOBRUNNER_TEST_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
JOBRUNNER_TEST_KAFKA_SASL_BOOTSTRAP=127.0.0.1:$KAFKA_SASL_PORT
JOBRUNNER_TEST_KAFKA_TLS_BOOTSTRAP=127.0.0.1:$KAFKA_TLS_PORT
JOBRUNNER_TEST_KAFKA_TLS_CA=$KAFKA_DIR/tls/ca.crt
JOBRUNNER_TEST_KAFKA_SASL_USER=$KAFKA_SASL_USER
JOBRUNNER_TEST_KAFKA_SASL_PASSWORD=$KAFKA_SASL_PASSWORD
JOBRUNNER_TEST_SQS_ENDPOINT=http://127.0.0.1:$ELASTICMQ_PORT
JOBRUNNER_TEST_REDIS_ADDRESS=127.0.0.1:$REDIS_PORT
JOBRUNNER_TEST_REDIS_USER=$REDIS_USER
JOBRUNNER_TEST_REDIS_PASSWORD=$REDIS_PASSWORD
JOBRUNNER_TEST_NATS_URL=nats://127.0.0.1:$NATS_PORT
JOBRUNNER_TEST_NATS_MONITORING=127.0.0.1:$NATS_MONITOR_PORT
JOBRUNNER_TEST_MQTT_URL=mqtt://127.0.0.1:$MQTT_PORT
JOBRUNNER_TEST_STACK_RESTART=$HERE/stack-restart.sh
JOBRUNNER_TEST_STACK_STATE=$JOBRUNNER_STATE
JOBRUNNER_TEST_REAL_NODE=$REAL_NODE_NAME
JOBRUNNER_TEST_REAL_NODE_TAINT=$REAL_NODE_TAINT
JOBRUNNER_TEST_NODE_IP=$NODE_IP
JOBRUNNER_TEST_CONTAINERD_SOCK=$CONTAINERD_SOCK
JOBRUNNER_TEST_POD_LOGS=$NODE_DIR/pod-logs
ENV
  # The real node's images (build-node-images.sh names them by the hash of their inputs).
  if [[ -f "$NODE_IMAGE_CACHE/images.env" ]]; then
    sed -e 's/^PROJECT_IMAGE=/JOBRUNNER_TEST_JOBRUNNER_IMAGE=/; t' -e 's/^/JOBRUNNER_TEST_/' "$NODE_IMAGE_CACHE/images.env" >> "$fresh"
  fi
  azurite_env >> "$fresh"
  kueue_env >> "$fresh"
  # Keep what other parts (started by another checkout's stack-up) wrote: several
  # branches share one stack.
  if [[ -f "$ENV_FILE" ]]; then
    grep -E '^[A-Z_]+=' "$ENV_FILE" | while IFS= read -r line; do
      grep -q "^${line%%=*}=" "$fresh" || echo "$line"
    done >> "$fresh"
  fi
  mv "$fresh" "$ENV_FILE"
}

parts=("$@"); (( ${#parts[@]} )) || parts=(all)
start=$SECONDS
for part in "${parts[@]}"; do
  case "$part" in
    all)
      bash "$HERE/install-system.sh"
      # Every cached binary at once: the downloads of one overlap the compiling of another;
      # the real node's images (debootstrap, pip: mostly downloads) beside them.
      bash "$HERE/build-node-images.sh" & images=$!
      bash "$HERE/build-all.sh" || { wait "$images" || true; die "building the stack's binaries (see the messages above)"; }
      wait "$images" || die "building the real node's images (see the messages above)"
      up_k8s; up_kueue; up_rabbitmq; up_kafka; up_azurite; up_sqs; up_redis; up_nats; up_mqtt ;;
    k8s) up_k8s ;;
    kueue) up_kueue ;;
    node) up_node ;;
    rabbitmq) up_rabbitmq ;;
    kafka) up_kafka ;;
    azurite) up_azurite ;;
    sqs) up_sqs ;;
    redis) up_redis ;;
    nats) up_nats ;;
    mqtt) up_mqtt ;;
    *) die "unknown part '$part' (use all, k8s, kueue, node, rabbitmq, kafka, azurite, sqs, redis, nats or mqtt)" ;;
  esac
done
# stack-restart.sh restarts one part without rewriting the env file others read.
[[ "${JOBRUNNER_STACK_WRITE_ENV:-1}" == 1 ]] && write_env
log "stack up in $((SECONDS - start))s"
log "kubeconfig: $KUBECONFIG_PATH"
log "environment for tests: $ENV_FILE"
echo "$KUBECONFIG_PATH"
