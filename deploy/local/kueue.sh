# The stack's `kueue` part: Kueue $KUEUE_VERSION (job queueing and quota) run OUT of
# cluster as a process on this machine, like the control plane. Sourced by stack-up.sh,
# never run: it uses stack-up.sh's kcurl, running_with, remember_args, APISERVER_URL and
# PKI. Its webhooks are called by url (https://127.0.0.1:$KUEUE_WEBHOOK_PORT) with a CA
# of its own; the batch/v1 Job ones see only Jobs labelled kueue.x-k8s.io/queue-name (see
# kueue-manifests.py), so the rest of the tests' Jobs never pass through Kueue.
# shellcheck shell=bash

KUEUE_DIR="$JOBRUNNER_STATE/kueue"
# The ResourceFlavor for the KWOK node (its `type: kwok` label); tests name it in the
# ClusterQueues they create (JOBRUNNER_TEST_KUEUE_FLAVOR).
KUEUE_FLAVOR="${KUEUE_FLAVOR:-kwok}"
KUEUE_NAMESPACE=kueue-system
# Kueue reads its metrics server's certificate from this fixed path when its own cert
# management is off; the process gets $KUEUE_DIR/certs bind-mounted there in a mount
# namespace of its own, so nothing of one stack lands in the machine's /etc.
KUEUE_METRICS_CERTS=/etc/kueue/metrics/certs

kueue_ready() { curl -sf "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" >/dev/null 2>&1; }

# Until /readyz answers, for 120 s at most; at once if the process is gone.
kueue_wait_ready() {
  local deadline=$((SECONDS + 120))
  until kueue_ready; do
    pid_alive kueue && (( SECONDS < deadline )) || return 1
    sleep 0.5
  done
}

# A local CA and a serving certificate for 127.0.0.1 (the webhook and metrics servers).
kueue_certs() {
  local ca="$KUEUE_DIR/ca" certs="$KUEUE_DIR/certs" certlog="$LOG_DIR/kueue-certs.log"
  mkdir -p "$ca" "$certs"
  if [[ ! -f "$ca/ca.crt" ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$ca/ca.key" -out "$ca/ca.crt" -days 3650 \
      -subj /CN=jobrunner-kueue-ca >>"$certlog" 2>&1 || die "openssl req -x509 (Kueue's CA in $ca)" "$certlog"
    chmod 600 "$ca/ca.key"
  fi
  [[ -f "$certs/tls.crt" && "$certs/tls.crt" -nt "$ca/ca.crt" ]] && return
  (
    openssl req -newkey rsa:2048 -nodes -keyout "$certs/tls.key" -out "$certs/tls.csr" -subj /CN=127.0.0.1
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n' \
      > "$certs/tls.ext"
    openssl x509 -req -in "$certs/tls.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -CAcreateserial \
      -out "$certs/tls.crt" -days 3650 -extfile "$certs/tls.ext"
    chmod 600 "$certs/tls.key"
  ) >>"$certlog" 2>&1 || die "openssl (Kueue's serving certificate in $certs)" "$certlog"
}

# Kueue's Configuration (config.kueue.x-k8s.io/v1beta2): everything on 127.0.0.1, one
# process (no leader election), certificates given rather than rotated into a Secret.
kueue_config() {
  cat <<YAML
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: $KUEUE_NAMESPACE
health:
  healthProbeBindAddress: 127.0.0.1:$KUEUE_HEALTH_PORT
metrics:
  bindAddress: 127.0.0.1:$KUEUE_METRICS_PORT
webhook:
  host: 127.0.0.1
  port: $KUEUE_WEBHOOK_PORT
  certDir: $KUEUE_DIR/certs
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
# Only Jobs that name a LocalQueue are Kueue's; the rest of the suite's are not.
manageJobsWithoutQueueName: false
# The controller-manager figures of the stack: Kueue's defaults (20/30) throttle it.
clientConnection:
  qps: 200
  burst: 300
integrations:
  frameworks: ["batch/job"]
featureGates:
  # The visibility API is an aggregated API server on 0.0.0.0:8082; nothing here uses it.
  VisibilityOnDemand: false
YAML
}

# kueue_apply PATH URL-PATH: server-side apply of one object (Kueue's CRDs are too large
# for client-side apply's last-applied annotation).
kueue_apply() {
  kcurl -X PATCH -H 'Content-Type: application/apply-patch+yaml' --data-binary @"$1" \
    "$APISERVER_URL$2?fieldManager=jobrunner-stack-kueue&force=true" >"$LOG_DIR/kueue-apply.log" 2>&1 \
    || die "server-side apply of $2 ($1)" "$LOG_DIR/kueue-apply.log"
}

kueue_crd_established() {
  kcurl "$APISERVER_URL/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$1" | python3 -c '
import json, sys
conditions = json.load(sys.stdin).get("status", {}).get("conditions", [])
sys.exit(0 if any(c["type"] == "Established" and c["status"] == "True" for c in conditions) else 1)'
}

kueue_apply_crds() {
  local crd name
  for crd in "$KUEUE_DIR/manifests/crds"/*.json; do
    name="$(basename "$crd" .json)"
    kueue_apply "$crd" "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$name"
  done
  for crd in "$KUEUE_DIR/manifests/crds"/*.json; do
    name="$(basename "$crd" .json)"
    wait_for "CRD $name" 60 kueue_crd_established "$name" || die "CRD $name not Established within 60s"
  done
}

# The webhook answers: a server-side dry run of a labelled Job comes back suspended.
kueue_webhook_ready() {
  kcurl -X POST -H 'Content-Type: application/json' \
    "$APISERVER_URL/apis/batch/v1/namespaces/default/jobs?dryRun=All" --data-binary @- <<'JSON' \
    | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["spec"].get("suspend") is True else 1)'
{"apiVersion": "batch/v1", "kind": "Job",
 "metadata": {"name": "kueue-webhook-probe", "labels": {"kueue.x-k8s.io/queue-name": "probe"}},
 "spec": {"template": {"spec": {"restartPolicy": "Never",
   "containers": [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "1m"}}}]}}}}
JSON
}

kueue_flavor() {
  cat > "$KUEUE_DIR/flavor.yaml" <<YAML
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata:
  name: $KUEUE_FLAVOR
spec:
  # kwok-node-0's label (deploy/local/kwok/node.json): admitted Jobs are pinned to KWOK.
  nodeLabels:
    type: kwok
YAML
  kueue_apply "$KUEUE_DIR/flavor.yaml" "/apis/kueue.x-k8s.io/v1beta2/resourceflavors/$KUEUE_FLAVOR"
}

# Manifests and configuration into $KUEUE_DIR; prints a fingerprint of them all.
kueue_prepare() {
  local manager="$1"
  kueue_certs
  kueue_config > "$KUEUE_DIR/config.yaml"
  # A copy of the stack's kubeconfig (the admin token), readable by root only.
  install -m 600 "$KUBECONFIG_PATH" "$KUEUE_DIR/kubeconfig"
  rm -rf "$KUEUE_DIR/manifests"
  python3 "$HERE/kueue-manifests.py" "$KUEUE_HOME/manifests" "$KUEUE_DIR/manifests" \
    "https://127.0.0.1:$KUEUE_WEBHOOK_PORT" "$KUEUE_DIR/ca/ca.crt" \
    || die "kueue-manifests.py (Kueue's manifests for an out-of-cluster manager)"
  cat "$manager" "$KUEUE_DIR/config.yaml" "$KUEUE_DIR/kubeconfig" "$KUEUE_DIR/certs/tls.crt" "$KUEUE_DIR/manifests"/*.json \
    "$KUEUE_DIR/manifests/crds"/*.json | sha256sum | cut -c1-16
}

up_kueue() {
  local manager fingerprint
  manager="$(bash "$HERE/build-kueue.sh")" || die "build-kueue.sh (building the Kueue manager)"
  mkdir -p "$KUEUE_DIR"
  apiserver_ready || die "Kueue needs the API server: start the k8s part first"
  fingerprint="$(kueue_prepare "$manager")"
  local args=("$manager" --config "$KUEUE_DIR/config.yaml" --kubeconfig "$KUEUE_DIR/kubeconfig"
    "(manifests $fingerprint)")
  if running_with kueue "${args[@]}" && kueue_ready && kueue_webhook_ready; then
    log "kueue already healthy"; return
  fi
  log "starting kueue $KUEUE_VERSION (webhook https://127.0.0.1:$KUEUE_WEBHOOK_PORT)"
  stop_pid kueue
  kueue_apply_crds
  kcurl -X POST -H 'Content-Type: application/json' "$APISERVER_URL/api/v1/namespaces" \
    --data "{\"metadata\":{\"name\":\"$KUEUE_NAMESPACE\"}}" >/dev/null 2>&1 || true
  mkdir -p "$KUEUE_METRICS_CERTS"
  start_bg kueue "$LOG_DIR/kueue.log" unshare --mount --propagation private -- bash -c \
    'mount --bind "$1" "$2" && shift 2 && exec "$@"' _ "$KUEUE_DIR/certs" "$KUEUE_METRICS_CERTS" \
    "$manager" --config "$KUEUE_DIR/config.yaml" --kubeconfig "$KUEUE_DIR/kubeconfig"
  remember_args kueue "${args[@]}"
  kueue_wait_ready || die "kueue (no /readyz on :$KUEUE_HEALTH_PORT within 120s)" "$LOG_DIR/kueue.log"
  kueue_apply "$KUEUE_DIR/manifests/mutating.json" \
    /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/kueue-mutating-webhook-configuration
  kueue_apply "$KUEUE_DIR/manifests/validating.json" \
    /apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/kueue-validating-webhook-configuration
  wait_for "kueue webhook" 60 kueue_webhook_ready \
    || die "kueue's webhook (a labelled Job's dry run not suspended within 60s)" "$LOG_DIR/kueue.log"
  kueue_flavor
  log "kueue ready; ResourceFlavor $KUEUE_FLAVOR"
}

kueue_env() {
  cat <<ENV
JOBRUNNER_TEST_KUEUE_FLAVOR=$KUEUE_FLAVOR
JOBRUNNER_TEST_KUEUE_HEALTH_URL=http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz
JOBRUNNER_TEST_KUEUE_METRICS_URL=https://127.0.0.1:$KUEUE_METRICS_PORT/metrics
JOBRUNNER_TEST_KUEUE_CA=$KUEUE_DIR/ca/ca.crt
ENV
}
