#!/usr/bin/env bash
# Installs the machine packages the local stack needs and a fresh Debian machine may
# lack: RabbitMQ (with Erlang), Redis, Mosquitto, a JDK for Kafka and ElasticMQ, Node and
# npm for Azurite, openssl and curl, zsh and fish (their shell completion is tested), and
# for the real node containerd, runc, CNI plugins, iptables, conntrack, busybox-static,
# buildah and debootstrap.
# Idempotent; needs root (or sudo) only when something is missing.
source "$(dirname "$0")/common.sh"

need=()
[[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || need+=(rabbitmq-server)
[[ -x /usr/bin/redis-server ]] || need+=(redis-server)
[[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
command -v java >/dev/null || need+=(default-jre-headless)
command -v mvn >/dev/null || need+=(maven)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v go >/dev/null || need+=(golang-go)
command -v npm >/dev/null || need+=(nodejs npm)   # Azurite
command -v zsh >/dev/null || need+=(zsh)           # the shell-completion tests
command -v fish >/dev/null || need+=(fish)
# The real node (node.sh) and its images (build-node-images.sh).
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
[[ -x /bin/busybox ]] && /bin/busybox --list | grep -qx sha256sum || need+=(busybox-static)
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
if (( ${#need[@]} == 0 )); then log "system packages present"; exit 0; fi

sudo=""; (( EUID == 0 )) || sudo="sudo"
log "installing: ${need[*]}"
aptlog="$JOBRUNNER_CACHE/apt.log"; mkdir -p "$JOBRUNNER_CACHE"
$sudo apt-get update >>"$aptlog" 2>&1 || die "apt-get update" "$aptlog"
# Keep the packages' init scripts from starting a system-wide RabbitMQ, Redis or
# Mosquitto: the stack starts its own servers with their own data dirs and configs.
policy_added=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod +x /usr/sbin/policy-rc.d; policy_added=1
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}" >>"$aptlog" 2>&1 \
  || { (( policy_added )) && $sudo rm -f /usr/sbin/policy-rc.d; die "apt-get install ${need[*]}" "$aptlog"; }
(( policy_added )) && $sudo rm -f /usr/sbin/policy-rc.d
log "installed: ${need[*]}"
