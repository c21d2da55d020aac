#!/usr/bin/env bash
# The PACS the `pacs` tests run against: Orthanc and its DICOMweb plugin (Debian packages `orthanc`,
# `orthanc-dicomweb`). Installed only, never started as a service: the tests start `Orthanc CONFIG.json`
# themselves on 127.0.0.1 with free ports and stop it afterwards (tests/orthanc.py).
# Idempotent and quiet: nothing is done when both are installed.
set -euo pipefail

PACKAGES=(orthanc orthanc-dicomweb)
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so

if command -v Orthanc >/dev/null 2>&1 && [[ -f "$PLUGIN" ]]; then
  exit 0
fi
SUDO=()
if [[ "$(id -u)" != 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
    echo "pacs.sh: installing ${PACKAGES[*]} needs root (or sudo)" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d: the package's post-install must not start Orthanc as a system service (the tests start their own)
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e "$policy" ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
  "${SUDO[@]}" chmod +x "$policy"
  created_policy=1
fi
trap '[[ $created_policy == 1 ]] && "${SUDO[@]}" rm -f "$policy"' EXIT
"${SUDO[@]}" apt-get update -qq >/dev/null
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
command -v Orthanc >/dev/null && [[ -f "$PLUGIN" ]] || { echo "pacs.sh: Orthanc or its DICOMweb plugin missing after install" >&2; exit 1; }
echo "pacs.sh: $(Orthanc --version 2>/dev/null | head -1) with the DICOMweb plugin" >&2
