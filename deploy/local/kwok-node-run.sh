#!/usr/bin/env bash
# Runs a second KWOK, in the foreground, for one fake node of the benchmark's own
# (`make bench-keda`): its pods can be told to start slowly (kwok/pod-start-stages.yaml),
# which the stack's shared KWOK must not do to everyone's pods. The node is tainted, so
# only pods that tolerate jobrunner.dev/bench land on it; the stack's KWOK manages only
# nodes annotated kwok.x-k8s.io/node=fake, so it leaves this one alone.
#
# Usage: kwok-node-run.sh NODE_NAME SERVER_PORT
# The caller owns the process (this execs kwok) and deletes the node when done.
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"

node="${1:?usage: kwok-node-run.sh NODE_NAME SERVER_PORT}"
port="${2:?usage: kwok-node-run.sh NODE_NAME SERVER_PORT}"
PKI="$JOBRUNNER_STATE/pki"
[[ -f "$KUBECONFIG_PATH" && -f "$PKI/admin.token" ]] || die "no local stack (no $KUBECONFIG_PATH): run make stack-up"
[[ -x "$KWOK_BIN/kwok" ]] || die "no kwok binary in $KWOK_BIN: run make stack-up"
stages="$GOMODCACHE/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
[[ -d "$stages" ]] || die "kwok stages not found in $stages (run build-kwok.sh)"

body="$(python3 -c '
import json, sys
name = sys.argv[1]
print(json.dumps({
    "apiVersion": "v1", "kind": "Node",
    "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                          "kubernetes.io/arch": "amd64", "type": "kwok"}},
    "spec": {"taints": [{"key": "jobrunner.dev/bench", "value": "keda", "effect": "NoSchedule"}]},
    "status": {"allocatable": {"cpu": "1000", "memory": "4Ti", "pods": "100000"},
               "capacity": {"cpu": "1000", "memory": "4Ti", "pods": "100000"}},
}))' "$node")"
code="$(curl -s -o /dev/null -w '%{http_code}' --cacert "$PKI/ca.crt" -H "Authorization: Bearer $(cat "$PKI/admin.token")" \
  -H 'Content-Type: application/json' -X POST --data "$body" "https://127.0.0.1:$APISERVER_PORT/api/v1/nodes")"
[[ "$code" == 201 || "$code" == 409 ]] || die "POST /api/v1/nodes ($node) answered HTTP $code"

log "starting kwok $KWOK_VERSION for node $node"
exec "$KWOK_BIN/kwok" \
  --kubeconfig "$KUBECONFIG_PATH" --manage-single-node "$node" \
  --node-lease-duration-seconds 40 --server-address "127.0.0.1:$port" --cidr 10.250.0.0/16 \
  --config "$stages/node/fast/node-initialize.yaml" \
  --config "$stages/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
  --config "$HERE/kwok/pod-start-stages.yaml" \
  --config "$stages/pod/fast/pod-delete.yaml" \
  --config "$HERE/kwok/job-pod-stages.yaml"
