#!/usr/bin/env bash
# Run a command against a Kubernetes cluster: the one KUBECONFIG names, or else a real control plane
# (etcd + kube-apiserver + kube-controller-manager v1.32, ../shared/k8s/control-plane) started here on
# 127.0.0.1 for the command's duration and stopped afterwards.
#
#   tests/e2e/with-cluster.sh CMD...      e.g. tests/e2e/with-cluster.sh .venv/bin/pytest -m e2e tests/e2e
#
# Env: KUBECONFIG (use that cluster: kind, minikube, any), MMAR_CONTROL_PLANE (the control-plane
# script; default ../shared/k8s/control-plane beside the checkout, else /work/shared/k8s/control-plane), PORT_BASE (its ports, default 26443),
# MMAR_E2E_CLUSTER_DIR (its state folder; default a fresh temporary one).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PATH="$ROOT/.tools/bin:$PATH"  # kubectl and helm from .ci/tools.sh, for the tests and for users' debugging

if [[ -n "${KUBECONFIG:-}" ]]; then
  echo "with-cluster: using the cluster of KUBECONFIG=$KUBECONFIG" >&2
  exec "$@"
fi

CONTROL_PLANE="${MMAR_CONTROL_PLANE:-}"
if [[ -z "$CONTROL_PLANE" ]]; then
  # beside the checkout (the workspace's layout), else the workspace's shared folder (a clone elsewhere)
  for candidate in "$ROOT/../shared/k8s/control-plane" /work/shared/k8s/control-plane; do
    if [[ -x "$candidate" ]]; then CONTROL_PLANE="$candidate"; break; fi
  done
fi
if [[ -z "$CONTROL_PLANE" || ! -x "$CONTROL_PLANE" ]]; then
  echo "with-cluster: no KUBECONFIG and no control plane at $CONTROL_PLANE (set MMAR_CONTROL_PLANE or KUBECONFIG)" >&2
  exit 2
fi
DIR="${MMAR_E2E_CLUSTER_DIR:-$(mktemp -d -t mmar-k8s.XXXXXX)}"
cleanup() { "$CONTROL_PLANE" down "$DIR" >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
echo "with-cluster: starting a control plane in $DIR (PORT_BASE=${PORT_BASE:-26443})" >&2
if ! "$CONTROL_PLANE" up "$DIR" >"$DIR.up.log" 2>&1; then
  cat "$DIR.up.log" >&2
  tail -n 30 "$DIR"/logs/* >&2 2>/dev/null || true
  exit 2
fi
export KUBECONFIG="$DIR/kubeconfig"
"$@"
