#!/usr/bin/env bash
# Runs the real KEDA operator (built by build-keda.sh) out of cluster against the local
# stack, in the foreground, watching only the namespaces given; for `make bench-keda`
# only (the tests never start it). Applies KEDA's CRDs server-side first (the ScaledJob
# CRD is too large for client-side apply's last-applied annotation).
#
# Usage: keda-run.sh NAMESPACE[,NAMESPACE...]
#   KEDA_HEALTH_PORT (default 0: any free port) - its /healthz and /readyz.
# The first namespace also holds KEDA's own objects (events, its cluster-object namespace).
# The caller owns the process: it execs the operator, so the pid it started is KEDA's.
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"

namespaces="${1:?usage: keda-run.sh NAMESPACE[,NAMESPACE...]}"
own_namespace="${namespaces%%,*}"
operator="$(bash "$HERE/build-keda.sh")" || die "build-keda.sh (building the KEDA operator)"

PKI="$JOBRUNNER_STATE/pki"
APISERVER_URL="https://127.0.0.1:$APISERVER_PORT"
[[ -f "$KUBECONFIG_PATH" && -f "$PKI/admin.token" ]] || die "no local stack (no $KUBECONFIG_PATH): run make stack-up"
kapi() { curl -sS --fail-with-body --cacert "$PKI/ca.crt" -H "Authorization: Bearer $(cat "$PKI/admin.token")" "$@"; }

established() {
  kapi "$APISERVER_URL/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$1" | python3 -c '
import json, sys
conditions = json.load(sys.stdin).get("status", {}).get("conditions", [])
sys.exit(0 if any(c["type"] == "Established" and c["status"] == "True" for c in conditions) else 1)'
}

# Server-side apply: the API server merges and keeps field ownership, no annotation.
mkdir -p "$LOG_DIR"
crdlog="$LOG_DIR/keda-crds.log"
for crd in "$KEDA_HOME"/crds/*.yaml; do
  base="$(basename "$crd" .yaml)"            # <group>_<plural>
  name="${base#*_}.${base%%_*}"              # <plural>.<group>
  kapi -X PATCH -H 'Content-Type: application/apply-patch+yaml' --data-binary @"$crd" \
    "$APISERVER_URL/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$name?fieldManager=jobrunner-bench-keda&force=true" \
    >"$crdlog" 2>&1 || die "server-side apply of CRD $name ($crd)" "$crdlog"
  wait_for "CRD $name" 30 established "$name" || die "CRD $name not Established within 30s" "$crdlog"
done

# KEDA's metrics gRPC server always serves TLS from --cert-dir; out of cluster nothing
# calls it, so a self-signed certificate made once is enough.
certs="$JOBRUNNER_STATE/keda/certs"
if [[ ! -f "$certs/tls.key" ]]; then
  mkdir -p "$certs"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=keda-operator \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$certs/tls.key" -out "$certs/tls.crt" >>"$LOG_DIR/keda-certs.log" 2>&1 \
    || die "openssl req (KEDA's gRPC certificate in $certs)" "$LOG_DIR/keda-certs.log"
  cp "$certs/tls.crt" "$certs/ca.crt"
fi

export KUBECONFIG="$KUBECONFIG_PATH" WATCH_NAMESPACE="$namespaces" \
  KEDA_CLUSTER_OBJECT_NAMESPACE="$own_namespace" POD_NAMESPACE="$own_namespace"
log "starting keda-operator $KEDA_VERSION (watching $namespaces)"
# --kube-api-qps/burst: KEDA's defaults (20/30) throttle its own creates on the client
# side; jobrunner has no such throttle, so KEDA gets the stack's controller figures.
# Metrics off ("0"), gRPC on any free port: nothing here reads them.
exec "$operator" \
  --leader-elect=false --enable-cert-rotation=false \
  --enable-webhook-patching=false --enable-apiservice-patching=false \
  --cert-dir="$certs" \
  --kube-api-qps=200 --kube-api-burst=300 \
  --metrics-bind-address=0 \
  --health-probe-bind-address="127.0.0.1:${KEDA_HEALTH_PORT:-0}" \
  --metrics-service-bind-address=127.0.0.1:0 \
  --zap-log-level=info --zap-encoder=console --zap-time-encoding=iso8601
