#!/usr/bin/env bash
# Run a command against a Kubernetes cluster whose pods really run: the one KUBECONFIG names (kind or any,
# with the images already loaded into it), or else a control plane and a real node (containerd, kubelet,
# scheduler, cluster DNS: ../shared/k8s/control-plane up + node up) started here for the command's duration,
# with the project's images loaded into the node, and stopped afterwards.
#
#   tests/cluster/with-node.sh CMD...     e.g. tests/cluster/with-node.sh .venv/bin/pytest -m cluster tests/cluster
#
# Images (MMAR_RUNTIME_IMAGE, MMAR_OPERATOR_IMAGE): default localhost/mmar:VERSION and
# localhost/mmar-operator:VERSION, as `make images` / .ci/images.sh build them with podman; `podman save`
# writes them to archives that `node load` imports (no registry). With KUBECONFIG set they must already be
# on the cluster's nodes (kind: `kind load docker-image`), under those names.
#
# What is missing (root, the node script, podman, an image) is not fatal here: the reason goes to the tests
# in MMAR_CLUSTER_UNAVAILABLE, and they skip with it, or fail under MMAR_CLUSTER_REQUIRED=1 (CI).
# Env: MMAR_CONTROL_PLANE, MMAR_NODE (the scripts; default beside the checkout, else /work/shared/k8s),
# MMAR_CLUSTER_PORT_BASE (default 28443: beside the e2e tier's 26443), MMAR_CLUSTER_DIR (state folder),
# MMAR_CLUSTER_PV_ROOT (the hostPath volumes' folder on the node, default /var/tmp/mmar-cluster-pv),
# MMAR_CLUSTER_KEEP=1 (keep the node's state folder afterwards; by default only its logs/ stay).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="$ROOT/.tools/bin:$PATH"
log() { printf '%s with-node: %s\n' "$(date -u +%T)" "$*" >&2; }
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -1)"
export MMAR_RUNTIME_IMAGE="${MMAR_RUNTIME_IMAGE:-localhost/mmar:$version}"
export MMAR_OPERATOR_IMAGE="${MMAR_OPERATOR_IMAGE:-localhost/mmar-operator:$version}"

if [[ -n "${KUBECONFIG:-}" ]]; then
  log "using the cluster of KUBECONFIG=$KUBECONFIG (images $MMAR_RUNTIME_IMAGE, $MMAR_OPERATOR_IMAGE must be on its nodes)"
  exec "$@"
fi

find_script() {  # NAME ENV_VALUE
  local candidate
  for candidate in "$2" "$ROOT/../shared/k8s/$1" "/work/shared/k8s/$1"; do
    [[ -n "$candidate" && -x "$candidate" ]] && { echo "$candidate"; return; }
  done
}
CONTROL_PLANE="$(find_script control-plane "${MMAR_CONTROL_PLANE:-}")"
NODE="$(find_script node "${MMAR_NODE:-}")"
if [[ -z "$CONTROL_PLANE" || -z "$NODE" ]]; then
  MMAR_CLUSTER_UNAVAILABLE="no KUBECONFIG, and no control-plane/node scripts (set MMAR_CONTROL_PLANE and MMAR_NODE, or KUBECONFIG)" exec "$@"
fi
if [[ $(id -u) -ne 0 ]]; then
  MMAR_CLUSTER_UNAVAILABLE="a real node needs root (containers, cgroups, network namespaces); run as root or set KUBECONFIG" exec "$@"
fi
if ! command -v podman >/dev/null; then
  MMAR_CLUSTER_UNAVAILABLE="no podman to save the images (run .ci/images.sh or make images first)" exec "$@"
fi
# the images as .ci/images.sh builds them (its containers.conf: runc, ulimits)
conf="${MMAR_IMAGES_STATE:-/var/tmp/mmar-images}/containers.conf"
[[ -f "$conf" && -z "${CONTAINERS_CONF:-}" ]] && export CONTAINERS_CONF="$conf"
for image in "$MMAR_RUNTIME_IMAGE" "$MMAR_OPERATOR_IMAGE"; do
  if ! podman image exists "$image"; then
    MMAR_CLUSTER_UNAVAILABLE="image $image is not built (make images, or bash .ci/images.sh; or set MMAR_RUNTIME_IMAGE / MMAR_OPERATOR_IMAGE)" exec "$@"
  fi
done

export PORT_BASE="${MMAR_CLUSTER_PORT_BASE:-28443}"
DIR="${MMAR_CLUSTER_DIR:-$(mktemp -d -t mmar-node.XXXXXX)}"
# mktemp makes it 0700: the node's dnsmasq (user nobody) must read its hosts folder inside, or cluster DNS
# answers NXDOMAIN for every name ("bad dynamic directory ...: Permission denied" in logs/dnsmasq.log)
chmod 0755 "$DIR"
export MMAR_CLUSTER_PV_ROOT="${MMAR_CLUSTER_PV_ROOT:-/var/tmp/mmar-cluster-pv}"
export MMAR_CLUSTER_LOCAL_NODE=1  # the node is this machine: hostPath volumes are folders here
cleanup() {
  log "stopping the node and the control plane ($DIR)"
  "$NODE" down "$DIR" >/dev/null 2>&1 || true
  "$CONTROL_PLANE" down "$DIR" >/dev/null 2>&1 || true
  rm -f "$DIR"/images/*.tar 2>/dev/null || true
  # A folder made here goes, its logs/ aside: the node's unpacked images are ~4.4 GB a run, and a few runs
  # filled this machine's disk until the kubelet evicted the operator pod (DiskPressure). Never while
  # anything is still mounted under it (a pod's hostPath bind mount would take the host's files with it).
  if [[ -z "${MMAR_CLUSTER_DIR:-}" && -z "${MMAR_CLUSTER_KEEP:-}" ]] && ! grep -qF " $DIR/" /proc/self/mounts; then
    find "$DIR" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} + 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$SECONDS
log "control plane + node in $DIR (PORT_BASE=$PORT_BASE)"
if ! "$CONTROL_PLANE" up "$DIR" >"$DIR.up.log" 2>&1 || ! "$NODE" up "$DIR" >>"$DIR.up.log" 2>&1; then
  tail -n 40 "$DIR.up.log" >&2
  tail -n 20 "$DIR"/logs/* >&2 2>/dev/null || true
  export MMAR_CLUSTER_UNAVAILABLE="control-plane up / node up failed (log: $DIR.up.log)"
  "$@"; exit $?
fi
mkdir -p "$DIR/images"
for image in "$MMAR_OPERATOR_IMAGE" "$MMAR_RUNTIME_IMAGE"; do
  tar="$DIR/images/$(basename "${image%%:*}").tar"
  log "podman save $image | node load"
  rm -f "$tar"
  if ! podman save -q -o "$tar" "$image" || ! "$NODE" load "$tar" "$DIR" >/dev/null; then
    export MMAR_CLUSTER_UNAVAILABLE="loading $image into the node failed"
    break
  fi
  rm -f "$tar"
done
log "cluster ready in $((SECONDS - start)) s"
export KUBECONFIG="$DIR/kubeconfig"
"$@"
