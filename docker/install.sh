#!/usr/bin/env bash
# Install mmar into the current Python environment, the way the container images do.
#
#   docker/install.sh [--print] TARGET [PHASE...]
#
# TARGET  operator  mmar[operator]: kopf, kubernetes, prometheus-client. Never torch.
#         runtime   mmar[runtime] for NVIDIA GPUs: CUDA torch, MONAI, ..., onnxruntime-gpu in
#                   place of onnxruntime, plus TensorRT.
# PHASE   torch     (runtime only) torch alone: the largest layer, changed least often
#         deps      the target's third-party requirements
#         project   mmar itself from SRC (default: the repository root), without dependencies
#         Default: every phase of the target, in that order. The Dockerfile runs them as separate
#         layers so that editing the source re-runs only `project`.
# --print prints the target's requirement list and exits (used by the tests).
#
# Requirement names come from pyproject.toml's extras; versions from docker/constraints.txt.
# Environment: PYTHON (default python3), SRC, PIP_EXTRA_ARGS (extra pip options).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="${SRC:-$(dirname "$HERE")}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$HERE/constraints.txt"

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

print_only=0
if [[ "${1:-}" == "--print" ]]; then print_only=1; shift; fi
target="${1:-}"; [[ -n "$target" ]] || usage; shift
case "$target" in operator|runtime) ;; *) echo "install.sh: unknown target '$target'" >&2; usage ;; esac
phases=("$@")
if [[ ${#phases[@]} -eq 0 ]]; then
  if [[ "$target" == runtime ]]; then phases=(torch deps project); else phases=(deps project); fi
fi

# The target's requirements, one per line, from pyproject.toml (tomllib: Python >= 3.11).
requirements() {
  "$PYTHON" - "$SRC/pyproject.toml" "$target" <<'PY'
import re, sys, tomllib
pyproject, target = sys.argv[1], sys.argv[2]
with open(pyproject, "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project.get("dependencies", [])) + list(project["optional-dependencies"][target])
if target == "runtime":
    # The image is for NVIDIA GPUs: the CUDA build of ONNX Runtime (with its CUDA/cuDNN wheels)
    # replaces the CPU one (both install the same module), and TensorRT is added.
    name = lambda r: re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower()
    reqs = [r for r in reqs if name(r) != "onnxruntime"] + ["onnxruntime-gpu[cuda,cudnn]", "tensorrt-cu13"]
print("\n".join(reqs))
PY
}

if [[ $print_only -eq 1 ]]; then requirements; exit 0; fi

pip() {
  # shellcheck disable=SC2086  # PIP_EXTRA_ARGS is a list of options
  "$PYTHON" -m pip install --no-cache-dir --disable-pip-version-check -c "$CONSTRAINTS" ${PIP_EXTRA_ARGS:-} "$@"
}

for phase in "${phases[@]}"; do
  case "$phase" in
    torch)
      [[ "$target" == runtime ]] || { echo "install.sh: phase torch is for the runtime target only" >&2; exit 2; }
      echo "install.sh: [$target] torch" >&2
      pip torch
      ;;
    deps)
      echo "install.sh: [$target] third-party requirements" >&2
      mapfile -t reqs < <(requirements)
      pip "${reqs[@]}"
      ;;
    project)
      echo "install.sh: [$target] mmar from $SRC" >&2
      pip --no-deps "$SRC"
      ;;
    *) echo "install.sh: unknown phase '$phase'" >&2; usage ;;
  esac
done

# Fail the build, not the first pod, when the operator image pulled torch in.
if [[ "$target" == operator ]] && "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"; then
  echo "install.sh: torch is importable in the operator environment; it must never be" >&2
  exit 1
fi
