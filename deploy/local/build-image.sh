#!/usr/bin/env bash
# Builds the jobrunner image from the Dockerfile with a real OCI builder that runs on this
# machine without a Docker engine (Debian's buildah, chroot isolation, vfs storage, which
# work inside a container), then proves it starts: `jobrunner --version` and /healthz.
#
# No registry image can be pulled here, so the base (PYTHON_IMAGE) is made from Debian's
# packages with debootstrap (python3, python3-venv, python3-pip), cached in the stack's
# cache. Where the Dockerfile's RUN steps reach PyPI through a TLS-intercepting proxy, the
# host's CA bundle ($SSL_CERT_FILE) is mounted for those steps only; it is not in the image.
#
#   bash deploy/local/build-image.sh            # -> localhost/jobrunner:<version>
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)"
IMAGE="${IMAGE:-localhost/jobrunner:$VERSION}"
BASE="${BASE_IMAGE:-localhost/debian-python:bookworm}"
B=(buildah --storage-driver vfs)

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing buildah and debootstrap (Debian packages)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null \
    || die "apt-get install buildah debootstrap"
fi

if ! "${B[@]}" inspect "$BASE" >/dev/null 2>&1; then
  rootfs="$JOBRUNNER_CACHE/image-base/rootfs"
  if [[ ! -x "$rootfs/usr/bin/python3" ]]; then
    log "debootstrap: Debian bookworm with python3 into $rootfs"
    mkdir -p "$(dirname "$rootfs")"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian >"$rootfs.log" 2>&1 \
      || die "debootstrap bookworm" "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  fi
  c="$("${B[@]}" from scratch)"
  cp -a "$rootfs/." "$("${B[@]}" mount "$c")/"
  "${B[@]}" umount "$c" >/dev/null
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
  "${B[@]}" commit --quiet "$c" "$BASE" >/dev/null
  "${B[@]}" rm "$c" >/dev/null
  log "base image $BASE made from Debian packages"
fi

ca=()
if [[ -n "${SSL_CERT_FILE:-}" && -f "$SSL_CERT_FILE" ]]; then
  ca=(-v "$SSL_CERT_FILE:/etc/ssl/certs/ca-certificates.crt:ro")
fi
start=$SECONDS
"${B[@]}" bud --isolation chroot --network host "${ca[@]}" \
  --build-arg "PYTHON_IMAGE=$BASE" -t "$IMAGE" "$ROOT" >"$JOBRUNNER_CACHE/image-build.log" 2>&1 \
  || die "buildah bud -t $IMAGE $ROOT" "$JOBRUNNER_CACHE/image-build.log"
log "built $IMAGE in $((SECONDS - start))s ($("${B[@]}" images --format '{{.Size}}' "$IMAGE"))"

# Does it start? The version, then /healthz of a dispatcher run from the image (the
# embedded mode: no cluster, no broker), as its own unprivileged user.
c="$("${B[@]}" from "$IMAGE")"
trap '"${B[@]}" rm "$c" >/dev/null 2>&1 || true' EXIT
"${B[@]}" run --isolation chroot "$c" -- jobrunner --version || die "jobrunner --version in $IMAGE"
port=18099
timeout 30 "${B[@]}" run --isolation chroot --network host \
  -v "$ROOT/deploy/examples/scaledjob-local.yaml:/etc/jobrunner/scaledjob.yaml:ro" \
  -e JOBRUNNER_TELEMETRY__HTTP_PORT=$port -e JOBRUNNER_TELEMETRY__HTTP_HOST=127.0.0.1 \
  "$c" -- jobrunner run --local --state-dir /tmp/state -f /etc/jobrunner/scaledjob.yaml \
  >"$JOBRUNNER_CACHE/image-run.log" 2>&1 &
for _ in $(seq 1 40); do
  if curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; then
    log "$IMAGE starts: /healthz answers $(curl -s "http://127.0.0.1:$port/healthz")"
    kill %1 2>/dev/null || true
    wait 2>/dev/null || true
    exit 0
  fi
  sleep 0.5
done
die "/healthz of $IMAGE did not answer" "$JOBRUNNER_CACHE/image-run.log"
