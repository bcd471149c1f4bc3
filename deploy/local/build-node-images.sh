#!/usr/bin/env bash
# Builds the real node's images without a registry (buildah, vfs storage, chroot
# isolation: no Docker engine) and saves each as an OCI archive that stack-up.sh imports
# into the node's containerd:
#   pause      the CRI sandbox image: busybox-static waiting for SIGTERM (no registry
#              serves registry.k8s.io/pause here);
#   busybox    a minimal image (busybox-static, every applet linked in /bin) for Job
#              containers that need a shell and sha256sum, nothing more;
#   python     Debian's python3 from debootstrap (build-image.sh's base image);
#   jobrunner  the project's image from the Dockerfile (operator, invoker), build-image.sh.
# Each is tagged with the hash of its inputs, so a warm stack-up rebuilds nothing, and a
# changed input is a new tag (never a stale image under an old name). Writes
# $NODE_IMAGE_CACHE/images.env with the four names.
source "$(dirname "$0")/common.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$JOBRUNNER_CACHE/node-images"
B=(buildah --storage-driver vfs)
mkdir -p "$OUT"

hash_of() { sha256sum | cut -c1-12; }
archive_of() { echo "$OUT/$(echo "$1" | tr '/:' '__').tar"; }

# save IMAGE: the OCI archive stack-up imports (named inside as IMAGE).
save() {
  local image="$1" archive; archive="$(archive_of "$1")"
  rm -f "$archive.new"
  "${B[@]}" push --quiet "$image" "oci-archive:$archive.new:$image" >>"$OUT/build.log" 2>&1 \
    || die "buildah push $image oci-archive:$archive" "$OUT/build.log"
  mv "$archive.new" "$archive"
}

# from_rootfs IMAGE DIR [buildah config args...]: an image whose only layer is DIR.
from_rootfs() {
  local image="$1" dir="$2"; shift 2
  local c; c="$("${B[@]}" from scratch)"
  cp -a "$dir/." "$("${B[@]}" mount "$c")/"
  "${B[@]}" umount "$c" >/dev/null
  "${B[@]}" config "$@" "$c"
  "${B[@]}" commit --quiet "$c" "$image" >/dev/null
  "${B[@]}" rm "$c" >/dev/null
}

busybox_rootfs() {
  local dir="$1" applet
  rm -rf "$dir"; mkdir -p "$dir/bin" "$dir/tmp" "$dir/etc" "$dir/work"
  chmod 1777 "$dir/tmp"
  cp /bin/busybox "$dir/bin/busybox"
  for applet in $(/bin/busybox --list); do [[ "$applet" == busybox ]] || ln -s busybox "$dir/bin/$applet"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' > "$dir/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' > "$dir/etc/group"
}

busybox_version="$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null || /bin/busybox | head -1)"
recipe="$(sed -n '/^busybox_rootfs()/,/^}/p' "$0")"

# ---------------------------------------------------------------- pause and busybox
PAUSE_IMAGE="localhost/jobrunner-pause:$(printf '%s\n%s\npause-1' "$busybox_version" "$recipe" | hash_of)"
BUSYBOX_IMAGE="localhost/jobrunner-busybox:$(printf '%s\n%s\nbusybox-1' "$busybox_version" "$recipe" | hash_of)"
if [[ ! -s "$(archive_of "$PAUSE_IMAGE")" || ! -s "$(archive_of "$BUSYBOX_IMAGE")" ]]; then
  rootfs="$OUT/busybox-rootfs"
  busybox_rootfs "$rootfs"
  # The sandbox's one process: it ends on SIGTERM, as registry.k8s.io/pause does.
  from_rootfs "$PAUSE_IMAGE" "$rootfs" --env PATH=/bin \
    --entrypoint '["/bin/sh", "-c", "trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]'
  from_rootfs "$BUSYBOX_IMAGE" "$rootfs" --env PATH=/bin --workingdir /work --cmd '["/bin/sh"]'
  save "$PAUSE_IMAGE"; save "$BUSYBOX_IMAGE"
  log "built $PAUSE_IMAGE and $BUSYBOX_IMAGE (busybox $busybox_version)"
fi

# ---------------------------------------------------------------- python and jobrunner
# build-image.sh makes the Debian Python base (debootstrap, cached) and the jobrunner
# image on it. The jobrunner image's inputs: the Dockerfile, the package and its templates.
base_recipe="$(sed -n '/^if ! "\${B\[@\]}" inspect "\$BASE"/,/^fi/p' "$HERE/build-image.sh")"
PYTHON_IMAGE="localhost/jobrunner-python:$(printf '%s\nbookworm' "$base_recipe" | hash_of)"
jobrunner_inputs="$(cd "$ROOT" && { cat Dockerfile pyproject.toml README.md; \
  find jobrunner job_templates -type f ! -name '*.pyc' ! -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum; } | hash_of)"
PROJECT_IMAGE="localhost/jobrunner:node-$jobrunner_inputs"
if [[ ! -s "$(archive_of "$PYTHON_IMAGE")" || ! -s "$(archive_of "$PROJECT_IMAGE")" ]]; then
  log "building $PROJECT_IMAGE (build-image.sh; a few minutes the first time)"
  IMAGE="$PROJECT_IMAGE" BASE_IMAGE=localhost/debian-python:bookworm bash "$HERE/build-image.sh" \
    || die "build-image.sh (the jobrunner image for the real node)"
  "${B[@]}" tag localhost/debian-python:bookworm "$PYTHON_IMAGE"
  save "$PYTHON_IMAGE"; save "$PROJECT_IMAGE"
  log "saved $PYTHON_IMAGE and $PROJECT_IMAGE"
  # Earlier builds of the jobrunner image are dropped (vfs storage copies every layer).
  for old in "$OUT"/localhost_jobrunner_node-*.tar; do
    [[ "$old" == "$(archive_of "$PROJECT_IMAGE")" ]] || rm -f "$old"
  done
  "${B[@]}" images --format '{{.Name}}:{{.Tag}}' | grep '^localhost/jobrunner:node-' | grep -vxF "$PROJECT_IMAGE" \
    | xargs -r "${B[@]}" rmi >/dev/null 2>&1 || true
fi

cat > "$OUT/images.env.new" <<ENV
PAUSE_IMAGE=$PAUSE_IMAGE
BUSYBOX_IMAGE=$BUSYBOX_IMAGE
PYTHON_IMAGE=$PYTHON_IMAGE
PROJECT_IMAGE=$PROJECT_IMAGE
ENV
mv "$OUT/images.env.new" "$OUT/images.env"
