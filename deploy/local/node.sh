# The stack's real node: containerd and runc (Debian's packages) and a kubelet and
# kube-proxy built from the control plane's Kubernetes version, registered as
# $REAL_NODE_NAME with a client certificate from the stack's CA. Sourced by stack-up.sh
# (which defines kcurl, PKI and the control plane); never run on its own.
#
# Networking: pods get addresses on the bridge $NODE_BRIDGE ($POD_CIDR, Debian's CNI
# bridge and host-local plugins); the host's end of the bridge, $NODE_IP, is the node's
# InternalIP and the API server's advertised address, so the `kubernetes` Service
# (10.96.0.1:443, programmed by kube-proxy in iptables mode) leads a pod to the API server.
# The API server therefore listens on every address, and the JOBRUNNER-LOCAL chain drops
# what reaches its port from any interface but loopback and the bridge: nothing of the
# stack is reachable from outside this machine, as before.
#
# The node carries the taint $REAL_NODE_TAINT=true:NoSchedule, so only pods that tolerate
# it land there; the KWOK nodes stay for scale. No cluster DNS runs: in-cluster clients
# find the API server by the KUBERNETES_SERVICE_HOST the kubelet sets, and the stack's
# brokers by $NODE_IP.

NODE_DIR="$JOBRUNNER_STATE/node"
NODE_IMAGE_CACHE="$JOBRUNNER_CACHE/node-images"
CONTAINERD_SOCK="$NODE_DIR/containerd/containerd.sock"
REAL_NODE_MAX_PODS="${REAL_NODE_MAX_PODS:-12}"

# Packages the node needs (idempotent; install-system.sh installs the rest of the stack's).
node_packages() {
  local need=()
  command -v containerd >/dev/null || need+=(containerd)
  command -v runc >/dev/null || need+=(runc)
  [[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
  command -v iptables >/dev/null || need+=(iptables)
  command -v conntrack >/dev/null || need+=(conntrack)
  [[ -x /bin/busybox ]] && busybox --list | grep -qx sha256sum || need+=(busybox-static)
  command -v buildah >/dev/null || need+=(buildah)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  (( ${#need[@]} == 0 )) && return
  log "installing for the real node: ${need[*]}"
  local aptlog="$JOBRUNNER_CACHE/apt-node.log"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >>"$aptlog" 2>&1 \
    || { apt-get update >>"$aptlog" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y \
         --no-install-recommends "${need[@]}" >>"$aptlog" 2>&1; } \
    || die "apt-get install ${need[*]}" "$aptlog"
}

# The bridge exists before the API server starts: its address is the one it advertises.
node_network() {
  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 || ip link add "$NODE_BRIDGE" type bridge \
    || die "ip link add $NODE_BRIDGE type bridge (the real node's pod network needs CAP_NET_ADMIN)"
  ip addr replace "$NODE_IP/${POD_CIDR#*/}" dev "$NODE_BRIDGE" || die "ip addr replace $NODE_IP dev $NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up || die "ip link set $NODE_BRIDGE up"
  # Pods reach the outside (PyPI is not needed by them, but DNS answers are) through the host.
  sysctl -qw net.ipv4.ip_forward=1 >/dev/null || die "sysctl net.ipv4.ip_forward=1"
  iptables -N JOBRUNNER-LOCAL 2>/dev/null || true
  iptables -F JOBRUNNER-LOCAL
  iptables -A JOBRUNNER-LOCAL -i lo -j RETURN
  iptables -A JOBRUNNER-LOCAL -i "$NODE_BRIDGE" -j RETURN
  iptables -A JOBRUNNER-LOCAL -j DROP
  iptables -C INPUT -p tcp --dport "$APISERVER_PORT" -j JOBRUNNER-LOCAL 2>/dev/null \
    || iptables -I INPUT -p tcp --dport "$APISERVER_PORT" -j JOBRUNNER-LOCAL \
    || die "iptables -I INPUT (keeping the API server's port to this machine)"
}

# issue_cert NAME SUBJECT EXTENSIONS: a key and a certificate signed by the stack's CA,
# made once (again when the CA changed).
issue_cert() {
  local name="$1" subject="$2" ext="$3"
  if [[ -s "$PKI/$name.crt" ]] && openssl verify -CAfile "$PKI/ca.crt" "$PKI/$name.crt" >/dev/null 2>&1; then
    return
  fi
  printf '%b\n' "$ext" > "$PKI/$name.ext"
  {
    openssl req -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "$subject" \
      && openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
        -days 3650 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt"
  } >>"$LOG_DIR/pki.log" 2>&1 || die "openssl (certificate $name for $subject)" "$LOG_DIR/pki.log"
  chmod 600 "$PKI/$name.key"
}

# kubeconfig_for NAME: a kubeconfig that authenticates with certificate NAME.
kubeconfig_for() {
  local name="$1" out="$NODE_DIR/$1.kubeconfig"
  cat > "$out" <<KC
apiVersion: v1
kind: Config
clusters:
- name: jobrunner-local
  cluster: {server: "$APISERVER_URL", certificate-authority: "$PKI/ca.crt"}
users:
- name: $name
  user: {client-certificate: "$PKI/$name.crt", client-key: "$PKI/$name.key"}
contexts:
- name: $name
  context: {cluster: jobrunner-local, user: $name}
current-context: $name
KC
  chmod 600 "$out"
}

# The node's certificates: its client (the Node authorizer knows it by system:node:NAME in
# system:nodes), its kubelet's serving certificate (the API server checks it for logs and
# exec), kube-proxy's client, and the API server's client for the kubelet.
node_pki() {
  mkdir -p "$NODE_DIR"
  issue_cert "node-$REAL_NODE_NAME" "/O=system:nodes/CN=system:node:$REAL_NODE_NAME" \
    'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
  issue_cert "kubelet-serving" "/CN=$REAL_NODE_NAME" \
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:$NODE_IP,DNS:$REAL_NODE_NAME"
  issue_cert kube-proxy "/CN=system:kube-proxy" \
    'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
  kubeconfig_for "node-$REAL_NODE_NAME"
  kubeconfig_for kube-proxy
}

containerd_ready() { ctr --address "$CONTAINERD_SOCK" version >/dev/null 2>&1; }

start_containerd() {
  local dir="$NODE_DIR/containerd"
  mkdir -p "$dir" "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam"
  # restrict_oom_score_adj: this machine lacks CAP_SYS_RESOURCE, and without it the pause
  # container's oom_score_adj of -998 fails every sandbox ("can't get final child's PID
  # from pipe: EOF"). The sandbox image is local: no registry is reachable. The pods'
  # network namespaces are mounted under the state directory (not /var/run/netns), so
  # stack-down finds and removes them with the rest, even after a kill.
  cat > "$dir/config.toml.new" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
TOML
  cat > "$NODE_DIR/cni/net.d/10-jobrunner.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "jobrunner",
  "plugins": [
    {"type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$NODE_DIR/cni/ipam",
              "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CNI
  if pid_alive containerd && containerd_ready && cmp -s "$dir/config.toml.new" "$dir/config.toml"; then
    rm -f "$dir/config.toml.new"; log "containerd already running"; return
  fi
  # A changed configuration restarts it; the containers it runs go on (their shims stay).
  stop_pid containerd
  mv "$dir/config.toml.new" "$dir/config.toml"
  log "starting containerd $(containerd --version | awk '{print $3}')"
  start_bg containerd "$LOG_DIR/containerd.log" containerd --config "$dir/config.toml"
  wait_for containerd 60 containerd_ready || die "containerd --config $dir/config.toml (no answer on $CONTAINERD_SOCK within 60s)" "$LOG_DIR/containerd.log"
}

# Imports the node's images (built and cached by build-node-images.sh) that containerd lacks.
import_node_images() {
  local have name archive
  have="$(ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls -q 2>/dev/null)"
  for name in "$PAUSE_IMAGE" "$BUSYBOX_IMAGE" "$PYTHON_IMAGE" "$PROJECT_IMAGE"; do
    grep -qxF "$name" <<<"$have" && continue
    archive="$NODE_IMAGE_CACHE/$(echo "$name" | tr '/:' '__').tar"
    ctr --address "$CONTAINERD_SOCK" -n k8s.io images import "$archive" >>"$LOG_DIR/containerd-import.log" 2>&1 \
      || die "ctr images import $archive" "$LOG_DIR/containerd-import.log"
    log "imported $name into containerd"
  done
  # Earlier builds of the jobrunner image go (a running container keeps its snapshot).
  grep '^localhost/jobrunner:node-' <<<"$have" | grep -vxF "$PROJECT_IMAGE" \
    | xargs -r ctr --address "$CONTAINERD_SOCK" -n k8s.io images rm >/dev/null 2>&1 || true
}

real_node_ready() {
  kcurl "$APISERVER_URL/api/v1/nodes/$REAL_NODE_NAME" 2>/dev/null \
    | python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if any(c["type"]=="Ready" and c["status"]=="True" for c in n.get("status",{}).get("conditions",[])) else 1)'
}

start_kubelet() {
  if pid_alive kubelet && curl -sf "http://127.0.0.1:10248/healthz" >/dev/null 2>&1 && real_node_ready; then
    log "kubelet already running ($REAL_NODE_NAME Ready)"; return
  fi
  stop_pid kubelet
  local dir="$NODE_DIR/kubelet"
  mkdir -p "$dir" "$NODE_DIR/pod-logs"
  # cgroup v1 (this machine's hierarchy) is allowed with failCgroupV1: false. Image GC and
  # disk eviction are off: no image can be pulled again here, and the suite's pods are small.
  cat > "$NODE_DIR/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "$NODE_IP"
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: "$PKI/kubelet-serving.crt"
tlsPrivateKeyFile: "$PKI/kubelet-serving.key"
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
containerRuntimeEndpoint: "unix://$CONTAINERD_SOCK"
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
enforceNodeAllocatable: []
localStorageCapacityIsolation: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
podLogsDir: "$NODE_DIR/pod-logs"
maxPods: $REAL_NODE_MAX_PODS
registerWithTaints:
- {key: "$REAL_NODE_TAINT", value: "true", effect: NoSchedule}
rotateCertificates: false
serverTLSBootstrap: false
shutdownGracePeriod: 0s
YAML
  log "starting kubelet $K8S_VERSION (node $REAL_NODE_NAME)"
  start_bg kubelet "$LOG_DIR/kubelet.log" "$K8S_BIN/kubelet" \
    --config "$NODE_DIR/kubelet.yaml" --kubeconfig "$NODE_DIR/node-$REAL_NODE_NAME.kubeconfig" \
    --root-dir "$dir" --hostname-override "$REAL_NODE_NAME" --node-ip "$NODE_IP" \
    --node-labels "$REAL_NODE_TAINT=true" --oom-score-adj 0 --v 1
  wait_for kubelet 120 real_node_ready \
    || die "kubelet (node $REAL_NODE_NAME not Ready within 120s)" "$LOG_DIR/kubelet.log"
  log "node $REAL_NODE_NAME Ready"
}

start_kube_proxy() {
  if pid_alive kube-proxy && curl -sf "http://127.0.0.1:10256/healthz" >/dev/null 2>&1; then
    log "kube-proxy already running"; return
  fi
  stop_pid kube-proxy
  # conntrack settings are left to the host (this machine's /proc/sys is not ours to tune);
  # oomScoreAdj 0 for the same reason as the kubelet's.
  cat > "$NODE_DIR/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$NODE_DIR/kube-proxy.kubeconfig"}
mode: iptables
clusterCIDR: "$POD_CIDR"
hostnameOverride: "$REAL_NODE_NAME"
healthzBindAddress: "127.0.0.1:10256"
metricsBindAddress: "127.0.0.1:10249"
oomScoreAdj: 0
nodePortAddresses: [primary]
iptables: {localhostNodePorts: false}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  log "starting kube-proxy $K8S_VERSION (iptables)"
  start_bg kube-proxy "$LOG_DIR/kube-proxy.log" "$K8S_BIN/kube-proxy" --config "$NODE_DIR/kube-proxy.yaml" --v 1
  wait_for kube-proxy 60 curl -sf "http://127.0.0.1:10256/healthz" \
    || die "kube-proxy (no /healthz within 60s)" "$LOG_DIR/kube-proxy.log"
}

# Who may do what on the node: the API server's client reaches the kubelet API (logs,
# exec) through the kubelet's webhook authorization.
node_rbac() {
  kcurl -X PATCH -H 'Content-Type: application/apply-patch+yaml' \
    "$APISERVER_URL/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/jobrunner-apiserver-kubelet-client?fieldManager=jobrunner-stack&force=true" \
    --data-binary @- >/dev/null <<YAML || die "applying the ClusterRoleBinding for the API server's kubelet client"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: jobrunner-apiserver-kubelet-client}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kubelet-api-admin"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}
YAML
}

up_node() {
  node_packages
  node_network
  node_pki
  node_rbac
  bash "$HERE/build-node-images.sh" || die "building the real node's images (see the messages above)"
  # shellcheck source=/dev/null
  source "$NODE_IMAGE_CACHE/images.env"
  start_containerd
  import_node_images
  # The kubelet first: kube-proxy waits for its Node to learn the node's address.
  start_kubelet
  start_kube_proxy
}
