#!/usr/bin/env bash
# CI: build both container images and smoke-test them (`make images`) on a fresh Debian machine with
# 2 cores, no Docker engine and no container registry. What it sets up, and why:
#   1. buildah/podman/runc/debootstrap from apt (crun fails here on hybrid cgroups: runc instead);
#   2. a containers.conf (via CONTAINERS_CONF, /etc untouched): runtime runc, and ulimits pinned to this
#      shell's hard limits (the defaults are above them, and containers then fail at setrlimit), nproc
#      also to at most kernel.pid_max;
#   3. the base image (build argument PYTHON_IMAGE): a STAND-IN made with debootstrap from the Debian
#      archive (Debian bookworm's Python 3.11), since no registry serves python:3.12-slim here. The
#      released images use the official Python base (the Dockerfile's default). Set PYTHON_IMAGE to use
#      an image the builder can pull instead;
#   4. `make images` with the CPU torch build and without TensorRT: torch from a local wheel folder
#      (TORCH_WHEELS, default: this machine's pip find-links, /opt/wheels) mounted into the build, or
#      from PyTorch's CPU index where there is none.
# Caches (debootstrap tree, config, demo output) live under MMAR_IMAGES_STATE (/var/tmp), never in the
# repository; podman keeps its layers in its own storage. No container is left running.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE="${MMAR_IMAGES_STATE:-/var/tmp/mmar-images}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
STAND_IN="localhost/mmar-python:3.11-${SUITE}"
mkdir -p "$STATE"
log() { printf '%s images.sh: %s\n' "$(date -u +%T)" "$*" >&2; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# --- 1. the builder ---------------------------------------------------------------------------------
missing=()
for tool in buildah podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [[ ${#missing[@]} -gt 0 ]]; then
  log "apt-get install ${missing[*]}"
  as_root apt-get update -qq
  # with podman's recommended packages: its network plugins (pip downloads inside the build), uidmap
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman runc debootstrap >/dev/null
fi

# --- 2. containers.conf -----------------------------------------------------------------------------
# nproc: runc's setrlimit fails above kernel.pid_max here (measured: 32768 works, 32769 does not)
nofile="$(ulimit -Hn)"
nproc="$(ulimit -Hu)"
pid_max="$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo "$nproc")"
[[ "$nproc" == unlimited || "$nproc" -gt "$pid_max" ]] && nproc="$pid_max"
[[ "$nofile" == unlimited ]] && nofile=1048576
conf="$STATE/containers.conf"
cat >"$conf.tmp" <<EOF
# written by .ci/images.sh
[engine]
runtime = "runc"

[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
EOF
mv "$conf.tmp" "$conf"
export CONTAINERS_CONF="$conf"

# --- 3. the base image ------------------------------------------------------------------------------
if [[ -z "${PYTHON_IMAGE:-}" ]]; then
  PYTHON_IMAGE="$STAND_IN"
  if podman image exists "$STAND_IN"; then
    log "stand-in base $STAND_IN already built"
  else
    log "no registry: making the stand-in base $STAND_IN with debootstrap ($SUITE, $MIRROR)"
    root="$STATE/rootfs-$SUITE"
    as_root rm -rf "$root"
    as_root debootstrap --variant=minbase \
      --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
      "$SUITE" "$root" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 \
      || { tail -20 "$STATE/debootstrap.log" >&2; exit 1; }
    # no package caches or lists in the image
    as_root rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
    as_root tar -C "$root" -c . | podman import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["python3"]' \
      --message "stand-in for python:3.12-slim: Debian $SUITE minbase + python3 (made by .ci/images.sh)" \
      - "$STAND_IN" >/dev/null
    as_root rm -rf "$root"
  fi
fi

# --- 4. build and smoke-test --------------------------------------------------------------------------
build_args=(--build-arg TORCH_VARIANT=cpu --build-arg TENSORRT=0)
wheels="${TORCH_WHEELS:-${PIP_FIND_LINKS:-/opt/wheels}}"
if compgen -G "$wheels/torch-*+cpu-*.whl" >/dev/null; then
  # a local CPU torch wheel (PyTorch's CPU index is not reachable from this machine)
  build_args+=(-v "$wheels:/wheels:ro" --build-arg TORCH_INDEX_URL= --build-arg PIP_EXTRA_ARGS=--find-links=/wheels)
fi
# outbound TLS goes through a proxy whose CA is in the host's bundle
ca=/etc/ssl/certs/ca-certificates.crt
[[ -f "$ca" ]] && build_args+=(-v "$ca:$ca:ro")

log "make images (podman, base $PYTHON_IMAGE)"
make images CONTAINER_ENGINE=podman PYTHON_IMAGE="$PYTHON_IMAGE" IMAGES_TMP="$STATE" \
  IMAGE_BUILD_ARGS="${build_args[*]}"
