# A second Kubernetes cluster on this machine, the `worker` part of the local stack: its own
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and one KWOK node, from the
# binaries the first cluster uses (no build of its own). It is meant to be a MultiKueue
# worker of the first cluster, which then is the manager.
#
# When the stack runs Kueue (kueue.sh), the worker gets a Kueue of its own (worker_kueue),
# and the first cluster, the MultiKueue manager, gets the objects that make the worker its
# MultiKueue worker (worker_multikueue): the worker's kubeconfig in a Secret, a
# MultiKueueCluster, a MultiKueueConfig and an AdmissionCheck, all named $WORKER_MULTIKUEUE.
# Tests make the ClusterQueues and LocalQueues on both sides (tests/integration/multikueue.py).
#
# Sourced by stack-up.sh (up_worker, worker_env), stack-status.sh (worker_status) and
# stack-down.sh (down_worker), after common.sh. Everything binds to 127.0.0.1; every
# daemon's pid file is named worker-* (the worker's Kueue's is $WORKER_DIR/pids/kueue.pid),
# so the first cluster's are never touched.
#
# Its own CA, service-account key and admin token (in $WORKER_DIR/pki), not the first
# cluster's: the two clusters are two trust domains as they are in a real MultiKueue setup,
# so no credential of one (the real node's client certificate, the admin token) opens the
# other, and the manager reaches the worker only with the kubeconfig it is given (whose CA
# is embedded), never because it happens to trust the same CA.

WORKER_DIR="$JOBRUNNER_STATE/worker"
WORKER_PKI="$WORKER_DIR/pki"
WORKER_KUBECONFIG="$WORKER_DIR/kubeconfig"
WORKER_ETCD_PORT="${WORKER_ETCD_PORT:-2479}"
WORKER_APISERVER_PORT="${WORKER_APISERVER_PORT:-6444}"
WORKER_KCM_PORT="${WORKER_KCM_PORT:-10267}"
WORKER_SCHEDULER_PORT="${WORKER_SCHEDULER_PORT:-10269}"
WORKER_KWOK_PORT="${WORKER_KWOK_PORT:-10277}"
WORKER_SERVICE_CIDR="${WORKER_SERVICE_CIDR:-10.97.0.0/16}"
WORKER_POD_CIDR="${WORKER_POD_CIDR:-10.251.0.0/16}"
WORKER_NODE="${WORKER_NODE:-worker-kwok-node-0}"
# The Go collector's target for the worker's API server: a heap of 1.5 times what is live
# (Go's default is 2 times), which the API server's start-up (OpenAPI, discovery) would
# otherwise leave resident for a cluster that holds a few test Jobs.
WORKER_GOGC="${WORKER_GOGC:-50}"
WORKER_APISERVER_URL="https://127.0.0.1:$WORKER_APISERVER_PORT"
# The worker's Kueue: kueue.sh's up_kueue run with these instead of the first cluster's.
WORKER_KUEUE_WEBHOOK_PORT="${WORKER_KUEUE_WEBHOOK_PORT:-9453}"
WORKER_KUEUE_HEALTH_PORT="${WORKER_KUEUE_HEALTH_PORT:-9454}"
WORKER_KUEUE_METRICS_PORT="${WORKER_KUEUE_METRICS_PORT:-9455}"
# The name of the MultiKueueCluster, MultiKueueConfig and AdmissionCheck on the manager,
# and of the Secret (in Kueue's namespace) holding the worker's kubeconfig.
WORKER_MULTIKUEUE="${WORKER_MULTIKUEUE:-worker}"
# The daemons, in start order (stack-down stops them in reverse).
# worker-kueue's pid file is a link to the one kueue.sh keeps in $WORKER_DIR/pids.
WORKER_DAEMONS=(worker-etcd worker-kube-apiserver worker-kube-controller-manager worker-kube-scheduler worker-kwok worker-kueue)

worker_kcurl() {
  curl -sS --fail --cacert "$WORKER_PKI/ca.crt" -H "Authorization: Bearer $(cat "$WORKER_PKI/admin.token")" "$@"
}
worker_etcd_ready() { curl -sf "http://127.0.0.1:$WORKER_ETCD_PORT/health" >/dev/null 2>&1; }
worker_apiserver_ready() { worker_kcurl "$WORKER_APISERVER_URL/readyz" >/dev/null 2>&1; }
worker_kcm_ready() { curl -skf "https://127.0.0.1:$WORKER_KCM_PORT/healthz" >/dev/null 2>&1; }
worker_scheduler_ready() { curl -skf "https://127.0.0.1:$WORKER_SCHEDULER_PORT/healthz" >/dev/null 2>&1; }
worker_kwok_alive() { pid_alive worker-kwok; }
worker_node_ready() {
  worker_kcurl "$WORKER_APISERVER_URL/api/v1/nodes/$WORKER_NODE" 2>/dev/null \
    | python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if any(c["type"]=="Ready" and c["status"]=="True" for c in n.get("status",{}).get("conditions",[])) else 1)'
}

# worker_cert NAME SUBJECT EXTENSIONS: a key and certificate signed by the worker's CA, made
# once (again when the CA changed).
worker_cert() {
  local name="$1" subject="$2" ext="$3" dir="$WORKER_PKI"
  if [[ -s "$dir/$name.crt" ]] && openssl verify -CAfile "$dir/ca.crt" "$dir/$name.crt" >/dev/null 2>&1; then
    return
  fi
  printf '%b\n' "$ext" > "$dir/$name.ext"
  {
    openssl req -newkey rsa:2048 -nodes -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "$subject" \
      && openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
        -days 3650 -extfile "$dir/$name.ext" -out "$dir/$name.crt"
  } >>"$LOG_DIR/worker-pki.log" 2>&1 || die "openssl (worker certificate $name for $subject)" "$LOG_DIR/worker-pki.log"
  chmod 600 "$dir/$name.key"
}

worker_pki() {
  local dir="$WORKER_PKI"
  mkdir -p "$dir"; chmod 700 "$dir"
  [[ -f "$dir/ca.key" ]] || {
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 3650 \
      -subj /CN=jobrunner-worker-ca >>"$LOG_DIR/worker-pki.log" 2>&1 \
      || die "openssl req -x509 (the worker cluster's CA)" "$LOG_DIR/worker-pki.log"
    chmod 600 "$dir/ca.key"
  }
  [[ -f "$dir/sa.key" ]] || {
    openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null || die "openssl genrsa (worker service-account key)"
    openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null || die "openssl rsa -pubout (worker)"
  }
  [[ -f "$dir/admin.token" ]] || {
    (umask 077; openssl rand -hex 24 > "$dir/admin.token")
    # token,user,uid,"groups": system:masters makes this an administrator of the worker only.
    (umask 077; printf '%s,worker-admin,worker-admin,"system:masters"\n' "$(cat "$dir/admin.token")" > "$dir/tokens.csv")
  }
  worker_cert apiserver "/CN=worker-kube-apiserver" \
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
}

# Self-contained (CA and token embedded, no file paths), so it can be handed as it is to the
# manager's Kueue in a MultiKueueCluster's Secret.
write_worker_kubeconfig() {
  local fresh="$WORKER_KUBECONFIG.new"
  (umask 077; cat > "$fresh" <<KC
apiVersion: v1
kind: Config
clusters:
- name: jobrunner-worker
  cluster:
    server: $WORKER_APISERVER_URL
    certificate-authority-data: $(base64 -w0 < "$WORKER_PKI/ca.crt")
users:
- name: worker-admin
  user:
    token: $(cat "$WORKER_PKI/admin.token")
contexts:
- name: jobrunner-worker
  context: {cluster: jobrunner-worker, user: worker-admin, namespace: default}
current-context: jobrunner-worker
KC
  )
  mv "$fresh" "$WORKER_KUBECONFIG"
}

# worker_daemon NAME READY SECONDS COMMAND...: start COMMAND as daemon NAME unless it already
# runs with exactly this command line (and the same CA) and READY answers; a daemon whose
# command line changed is restarted. Its clients reconnect on their own, so restarting one
# never needs restarting the others.
worker_daemon() {
  local name="$1" ready="$2" timeout="$3"; shift 3
  local want; want="ca=$(sha256sum < "$WORKER_PKI/ca.crt" | cut -c1-16) $*"
  if pid_alive "$name" && [[ "$(cat "$PID_DIR/$name.args" 2>/dev/null)" == "$want" ]] \
      && wait_for "$name" 20 "$ready"; then
    log "$name already healthy"; return
  fi
  stop_pid "$name"
  log "starting $name"
  start_bg "$name" "$LOG_DIR/$name.log" "$@"
  echo "$want" > "$PID_DIR/$name.args"
  wait_for "$name" "$timeout" "$ready" || die "$name: $1 (not ready within ${timeout}s)" "$LOG_DIR/$name.log"
}

# The settings that keep it quiet at idle, beside those of the first cluster (--v 1, no
# profiling, no leader election, whose lease renewals are most of an idle control plane's
# writes): etcd ticks every 500 ms (not 100 ms; the election timeout, 5 ticks, is what a
# fresh start waits before it leads, 2.5 s), the API server keeps no endpoint lease for
# the `kubernetes` Service (a write every 10 s; nothing in this cluster dials the Service:
# its only node is KWOK's), and the controller-manager runs only the controllers a Job
# needs (no informers nor resyncs for Deployments, volumes, quotas, nodes, ...). Without
# the node-lifecycle controller nothing would lift the not-ready taint that the
# TaintNodesByCondition admission puts on a new Node, so that admission is off: KWOK's node
# is Ready from its first status, and a stopped KWOK is seen by stack-status, not by taints.
start_worker_etcd() {
  worker_daemon worker-etcd worker_etcd_ready 60 "$ETCD_BIN/etcd" \
    --name worker --data-dir "$WORKER_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$WORKER_ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$WORKER_ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((WORKER_ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((WORKER_ETCD_PORT + 1))" \
    --initial-cluster "worker=http://127.0.0.1:$((WORKER_ETCD_PORT + 1))" \
    --heartbeat-interval 500 --election-timeout 2500 \
    --unsafe-no-fsync --quota-backend-bytes 1073741824 --log-level warn
}

worker_apiserver_args() {
  printf '%s\n' env GOGC="$WORKER_GOGC" "$K8S_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$WORKER_ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$WORKER_APISERVER_PORT" \
    --endpoint-reconciler-type none \
    --tls-cert-file "$WORKER_PKI/apiserver.crt" --tls-private-key-file "$WORKER_PKI/apiserver.key" \
    --client-ca-file "$WORKER_PKI/ca.crt" --token-auth-file "$WORKER_PKI/tokens.csv" \
    --authorization-mode RBAC --disable-admission-plugins TaintNodesByCondition \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$WORKER_PKI/sa.pub" --service-account-signing-key-file "$WORKER_PKI/sa.key" \
    --service-cluster-ip-range "$WORKER_SERVICE_CIDR" \
    --profiling=false --v 1
}
start_worker_apiserver() {
  local args; mapfile -t args < <(worker_apiserver_args)
  worker_daemon worker-kube-apiserver worker_apiserver_ready 120 "${args[@]}"
}

start_worker_controller_manager() {
  # job: runs the Jobs; garbage-collector: deletes a deleted Job's pods; namespace: a test's
  # namespace goes away; serviceaccount: each namespace's `default` account, without which
  # no pod is admitted; ttl-after-finished and pod-garbage-collector as on the first cluster.
  worker_daemon worker-kube-controller-manager worker_kcm_ready 60 "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$WORKER_KUBECONFIG" --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port "$WORKER_KCM_PORT" \
    --controllers job-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,ttl-after-finished-controller,pod-garbage-collector-controller \
    --service-account-private-key-file "$WORKER_PKI/sa.key" --root-ca-file "$WORKER_PKI/ca.crt" \
    --use-service-account-credentials=false --concurrent-job-syncs 10 \
    --kube-api-qps 100 --kube-api-burst 200 --profiling=false --v 1
}

start_worker_scheduler() {
  worker_daemon worker-kube-scheduler worker_scheduler_ready 60 "$K8S_BIN/kube-scheduler" \
    --kubeconfig "$WORKER_KUBECONFIG" --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port "$WORKER_SCHEDULER_PORT" \
    --kube-api-qps 100 --kube-api-burst 200 --profiling=false --v 1
}

# The same KWOK binary and the same stages as the first cluster's (stack-up.sh start_kwok),
# so a Job's pods run and end here as they do there (kwok/job-pod-stages.yaml: Succeeded,
# or Failed with kwok.jobrunner.dev/outcome, after kwok.jobrunner.dev/run-duration).
start_worker_kwok() {
  local stages="$GOMODCACHE/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage" here; here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  [[ -d "$stages" ]] || die "kwok stages not found in $stages (run build-kwok.sh)"
  worker_daemon worker-kwok worker_kwok_alive 10 "$KWOK_BIN/kwok" \
    --kubeconfig "$WORKER_KUBECONFIG" --manage-single-node "$WORKER_NODE" \
    --node-lease-duration-seconds 40 --server-address "127.0.0.1:$WORKER_KWOK_PORT" --cidr "$WORKER_POD_CIDR" \
    --config "$stages/node/fast/node-initialize.yaml" \
    --config "$stages/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
    --config "$stages/pod/fast/pod-ready.yaml" \
    --config "$stages/pod/fast/pod-delete.yaml" \
    --config "$here/kwok/job-pod-stages.yaml"
  local body code
  body="$(sed "s/kwok-node-0/$WORKER_NODE/g" "$here/kwok/node.json")"
  code="$(curl -s -o /dev/null -w '%{http_code}' --cacert "$WORKER_PKI/ca.crt" -H "Authorization: Bearer $(cat "$WORKER_PKI/admin.token")" \
    -H 'Content-Type: application/json' -X POST --data "$body" "$WORKER_APISERVER_URL/api/v1/nodes")"
  [[ "$code" == 201 || "$code" == 409 ]] || die "POST $WORKER_APISERVER_URL/api/v1/nodes ($WORKER_NODE) answered HTTP $code"
  wait_for "worker kwok node" 60 worker_node_ready || die "worker-kwok (node $WORKER_NODE not Ready within 60s)" "$LOG_DIR/worker-kwok.log"
  log "worker node $WORKER_NODE Ready"
}

up_worker() {
  for bin in "$ETCD_BIN/etcd" "$K8S_BIN/kube-apiserver" "$K8S_BIN/kube-controller-manager" "$K8S_BIN/kube-scheduler" "$KWOK_BIN/kwok"; do
    [[ -x "$bin" ]] || die "no $bin: the worker cluster uses the first cluster's binaries (make stack-up, or stack-up.sh k8s)"
  done
  mkdir -p "$WORKER_DIR" "$LOG_DIR" "$PID_DIR"
  worker_pki; write_worker_kubeconfig
  start_worker_etcd; start_worker_apiserver; start_worker_controller_manager; start_worker_scheduler; start_worker_kwok
  up_worker_kueue
}

down_worker() {
  local i
  for ((i = ${#WORKER_DAEMONS[@]} - 1; i >= 0; i--)); do
    if pid_alive "${WORKER_DAEMONS[i]}"; then log "stopping ${WORKER_DAEMONS[i]}"; fi
    # The API server drains at once, then lingers until SIGKILL (10 s): 2 s is enough.
    if [[ "${WORKER_DAEMONS[i]}" == worker-kube-apiserver ]]; then stop_pid worker-kube-apiserver 2; else stop_pid "${WORKER_DAEMONS[i]}"; fi
  done
}

# For stack-up.sh's write_env: only once the worker exists.
worker_env() {
  [[ -f "$WORKER_KUBECONFIG" ]] || return 0
  echo "JOBRUNNER_TEST_WORKER_KUBECONFIG=$WORKER_KUBECONFIG"
  echo "JOBRUNNER_TEST_WORKER_NODE=$WORKER_NODE"
  [[ -e "$PID_DIR/worker-kueue.pid" ]] || return 0
  echo "JOBRUNNER_TEST_WORKER_KUEUE_HEALTH_URL=http://127.0.0.1:$WORKER_KUEUE_HEALTH_PORT/readyz"
  # The manager's AdmissionCheck (and MultiKueueConfig, MultiKueueCluster) for the worker.
  echo "JOBRUNNER_TEST_MULTIKUEUE_ADMISSION_CHECK=$WORKER_MULTIKUEUE"
}

# worker_usage PIDFILE...: what the daemons of these pid files hold together: resident MiB, of which
# anonymous (their own; the rest is their binaries' pages, which the first cluster's
# daemons of the same binaries share), and the share of one core used since each started.
worker_usage() {
  python3 - "$@" <<'PY'
import os, sys
pid_files = sys.argv[1:]
tick, kib, cpu, age = os.sysconf("SC_CLK_TCK"), {"VmRSS": 0, "RssAnon": 0}, 0.0, 0.0
uptime = float(open("/proc/uptime").read().split()[0])
for pid_file in pid_files:
    try:
        pid = open(pid_file).read().strip()
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        continue
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in kib:
            kib[key] += int(value.split()[0])
    cpu += (int(stat[11]) + int(stat[12])) / tick
    age = max(age, uptime - int(stat[19]) / tick)
share = 100 * cpu / age if age else 0.0
print(f"{kib['VmRSS'] // 1024} MiB resident ({kib['RssAnon'] // 1024} MiB anonymous), "
      f"{share:.1f} % of one core since start ({cpu:.0f} s CPU in {age:.0f} s)")
PY
}

# For stack-status.sh: one line per daemon (its `check`), then what they use together.
worker_status() {
  check worker-etcd "http://127.0.0.1:$WORKER_ETCD_PORT" worker_etcd_ready
  check worker-kube-apiserver "$WORKER_APISERVER_URL" worker_apiserver_ready
  check worker-kube-controller-manager "https://127.0.0.1:$WORKER_KCM_PORT" worker_kcm_ready
  check worker-kube-scheduler "https://127.0.0.1:$WORKER_SCHEDULER_PORT" worker_scheduler_ready
  check worker-kwok "node $WORKER_NODE Ready" worker_node_ready
  if [[ -e "$PID_DIR/worker-kueue.pid" ]]; then
    check worker-kueue "webhook https://127.0.0.1:$WORKER_KUEUE_WEBHOOK_PORT, readyz http://127.0.0.1:$WORKER_KUEUE_HEALTH_PORT" worker_kueue_ready
  fi
  local pids=("${WORKER_DAEMONS[@]/#/$PID_DIR/}")
  pids=("${pids[@]/%/.pid}")
  echo "  worker kubeconfig: $WORKER_KUBECONFIG"
  echo "  worker cluster: $(worker_usage "${pids[@]}")"
}

# ---------------------------------------------------------------- Kueue and MultiKueue
worker_kueue_ready() { curl -sf "http://127.0.0.1:$WORKER_KUEUE_HEALTH_PORT/readyz" >/dev/null 2>&1; }

# The worker's Kueue: kueue.sh's own up_kueue (the same build, CRDs, url webhooks with a CA
# of their own, configuration), in a subshell whose variables name the worker: its API
# server and admin token, its own ports, state in $WORKER_DIR/kueue, pid and args in
# $WORKER_DIR/pids, log in $LOG_DIR/worker/kueue.log. One code path for both Kueues, so
# the worker's is configured as the manager's is.
worker_kueue() {
  (
    KUEUE_DIR="$WORKER_DIR/kueue" PID_DIR="$WORKER_DIR/pids" LOG_DIR="$LOG_DIR/worker"
    KUEUE_WEBHOOK_PORT="$WORKER_KUEUE_WEBHOOK_PORT" KUEUE_HEALTH_PORT="$WORKER_KUEUE_HEALTH_PORT"
    KUEUE_METRICS_PORT="$WORKER_KUEUE_METRICS_PORT"
    APISERVER_URL="$WORKER_APISERVER_URL" PKI="$WORKER_PKI" TOKEN_FILE="$WORKER_PKI/admin.token"
    KUBECONFIG_PATH="$WORKER_KUBECONFIG"
    mkdir -p "$PID_DIR" "$LOG_DIR"
    log "worker: kueue (webhook https://127.0.0.1:$KUEUE_WEBHOOK_PORT)"
    up_kueue
  )
  ln -sf worker/kueue.log "$LOG_DIR/worker-kueue.log"
  ln -sf "$WORKER_DIR/pids/kueue.pid" "$PID_DIR/worker-kueue.pid"
}

# mk_apply LOGFILE URL-PATH: server-side apply of the JSON on stdin to the manager.
mk_apply() {
  kcurl -X PATCH -H 'Content-Type: application/apply-patch+yaml' --data-binary @- \
    "$APISERVER_URL$2?fieldManager=jobrunner-stack-worker&force=true" >"$1" 2>&1 \
    || die "server-side apply of $2 on the manager" "$1"
}

mk_active() {
  kcurl "$APISERVER_URL/apis/kueue.x-k8s.io/v1beta2/$1/$WORKER_MULTIKUEUE" | python3 -c '
import json, sys
conditions = json.load(sys.stdin).get("status", {}).get("conditions", [])
sys.exit(0 if any(c["type"] == "Active" and c["status"] == "True" for c in conditions) else 1)'
}

# The manager's side: the worker's kubeconfig (self-contained: embedded CA, a token) in a
# Secret in Kueue's namespace, read by the manager's Kueue alone, and the MultiKueue objects
# that name it. The Secret's answer goes to /dev/null: it echoes the kubeconfig.
worker_multikueue() {
  local name="$WORKER_MULTIKUEUE" mklog="$LOG_DIR/worker-multikueue.log" group=/apis/kueue.x-k8s.io/v1beta2
  python3 - "$name" "$KUEUE_NAMESPACE" "$WORKER_KUBECONFIG" <<'PY' | mk_apply /dev/null "/api/v1/namespaces/$KUEUE_NAMESPACE/secrets/$name"
import base64, json, sys
name, namespace, path = sys.argv[1:]
data = base64.b64encode(open(path, "rb").read()).decode()
print(json.dumps({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": name, "namespace": namespace}, "data": {"kubeconfig": data}}))
PY
  mk_apply "$mklog" "$group/multikueueclusters/$name" <<JSON
{"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "MultiKueueCluster", "metadata": {"name": "$name"},
 "spec": {"clusterSource": {"kubeConfig": {"locationType": "Secret", "location": "$name"}}}}
JSON
  mk_apply "$mklog" "$group/multikueueconfigs/$name" <<JSON
{"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "MultiKueueConfig", "metadata": {"name": "$name"},
 "spec": {"clusters": ["$name"]}}
JSON
  mk_apply "$mklog" "$group/admissionchecks/$name" <<JSON
{"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "AdmissionCheck", "metadata": {"name": "$name"},
 "spec": {"controllerName": "kueue.x-k8s.io/multikueue",
          "parameters": {"apiGroup": "kueue.x-k8s.io", "kind": "MultiKueueConfig", "name": "$name"}}}
JSON
  wait_for "MultiKueueCluster $name" 60 mk_active multikueueclusters \
    || die "MultiKueueCluster $name not Active within 60s (the manager's Kueue cannot reach the worker)" "$LOG_DIR/kueue.log"
  wait_for "AdmissionCheck $name" 60 mk_active admissionchecks \
    || die "AdmissionCheck $name not Active within 60s" "$LOG_DIR/kueue.log"
  log "MultiKueue: AdmissionCheck $name on the manager dispatches to the worker"
}

# Kueue on both sides, when the stack has Kueue (kueue.sh sourced, the manager's Kueue up).
up_worker_kueue() {
  if ! declare -F up_kueue >/dev/null; then log "worker: no kueue.sh in this checkout, no Kueue on the worker"; return; fi
  if ! kueue_ready; then log "worker: the manager's Kueue is not running (stack-up.sh kueue), no MultiKueue"; return; fi
  worker_kueue; worker_multikueue
}
