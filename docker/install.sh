#!/usr/bin/env bash
# Install mmar into the current Python environment, the way the container images do.
#
#   docker/install.sh [--print] TARGET [PHASE...]
#
# TARGET  operator  mmar[operator]: kopf, kubernetes, prometheus-client. Never torch.
#         runtime   mmar[runtime]: torch, MONAI, ...; with the CUDA torch build (the default) also
#                   onnxruntime-gpu in place of onnxruntime, and TensorRT.
# PHASE   torch     (runtime only) torch alone: the largest layer, changed least often
#         deps      the target's third-party requirements
#         project   mmar itself from SRC (default: the repository root), without dependencies
#         Default: every phase of the target, in that order. The Dockerfile runs them as separate
#         layers so that editing the source re-runs only `project`.
# --print prints the target's requirement list and exits (used by the tests).
#
# Requirement names come from pyproject.toml's extras; versions from docker/constraints.txt.
# Environment (the Dockerfile's build arguments of the same names):
#   TORCH_VARIANT    cuda (default): PyPI's torch, the CUDA build, with onnxruntime-gpu.
#                    cpu: torch==PIN+cpu (no CUDA libraries: a much smaller image), onnxruntime.
#   TORCH_INDEX_URL  where the cpu build comes from, as an extra index (default
#                    https://download.pytorch.org/whl/cpu; empty: none, e.g. with --find-links)
#   TENSORRT         1: add TensorRT; 0: leave it out. Default: 1 for cuda, 0 for cpu.
#   EXTRA_INDEX_URL  an extra package index for every phase (TensorRT's real wheels are on
#                    https://pypi.nvidia.com; PyPI's tensorrt-cu13-libs only fetches them from there)
#   PIP_EXTRA_ARGS   more pip options, e.g. --find-links=/wheels (no spaces inside one option)
#   PYTHON (default python3), SRC
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="${SRC:-$(dirname "$HERE")}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$HERE/constraints.txt"

usage() { sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "install.sh: $*" >&2; exit 2; }

print_only=0
if [[ "${1:-}" == "--print" ]]; then print_only=1; shift; fi
target="${1:-}"; [[ -n "$target" ]] || usage; shift
case "$target" in operator|runtime) ;; *) echo "install.sh: unknown target '$target'" >&2; usage ;; esac
phases=("$@")
if [[ ${#phases[@]} -eq 0 ]]; then
  if [[ "$target" == runtime ]]; then phases=(torch deps project); else phases=(deps project); fi
fi

TORCH_VARIANT="${TORCH_VARIANT:-cuda}"
case "$TORCH_VARIANT" in cuda|cpu) ;; *) die "TORCH_VARIANT must be cuda or cpu, not '$TORCH_VARIANT'" ;; esac
if [[ -z "${TENSORRT:-}" ]]; then
  if [[ "$TORCH_VARIANT" == cuda ]]; then TENSORRT=1; else TENSORRT=0; fi
fi
case "$TENSORRT" in 0|1) ;; *) die "TENSORRT must be 0 or 1, not '$TENSORRT'" ;; esac
if [[ "$TENSORRT" == 1 && "$TORCH_VARIANT" == cpu ]]; then
  die "TENSORRT=1 needs TORCH_VARIANT=cuda (TensorRT runs on NVIDIA GPUs only)"
fi

# The target's requirements, one per line, from pyproject.toml (tomllib: Python >= 3.11).
requirements() {
  "$PYTHON" - "$SRC/pyproject.toml" "$target" "$TORCH_VARIANT" "$TENSORRT" <<'PY'
import re, sys, tomllib
pyproject, target, variant, tensorrt = sys.argv[1:5]
with open(pyproject, "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project.get("dependencies", [])) + list(project["optional-dependencies"][target])
if target == "runtime" and variant == "cuda":
    # For NVIDIA GPUs: the CUDA build of ONNX Runtime (with its CUDA/cuDNN wheels) replaces the
    # CPU one (both install the same module).
    name = lambda r: re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower()
    reqs = [r for r in reqs if name(r) != "onnxruntime"] + ["onnxruntime-gpu[cuda,cudnn]"]
if target == "runtime" and tensorrt == "1":
    reqs.append("tensorrt-cu13")
print("\n".join(reqs))
PY
}

if [[ $print_only -eq 1 ]]; then requirements; exit 0; fi

pip() {
  local extra=()
  [[ -n "${EXTRA_INDEX_URL:-}" ]] && extra=(--extra-index-url "$EXTRA_INDEX_URL")
  # shellcheck disable=SC2086  # PIP_EXTRA_ARGS is a list of options
  "$PYTHON" -m pip install --no-cache-dir --disable-pip-version-check -c "$CONSTRAINTS" "${extra[@]}" \
    ${PIP_EXTRA_ARGS:-} "$@"
}

# torch's requirement. PyPI's Linux wheel is the CUDA build; the CPU build is the same version with
# the local label +cpu, which only PyTorch's CPU index (or a folder of such wheels) has: asking for
# it by that label makes sure no source substitutes the CUDA build.
torch_requirement() {
  if [[ "$TORCH_VARIANT" == cuda ]]; then echo torch; return; fi
  local pin
  pin="$(awk -F'==' 'tolower($1) == "torch" { sub(/[[:space:]#].*/, "", $2); print $2 }' "$CONSTRAINTS")"
  [[ -n "$pin" ]] || { echo "install.sh: $CONSTRAINTS: no torch==VERSION pin" >&2; exit 1; }
  echo "torch==${pin}+cpu"
}

for phase in "${phases[@]}"; do
  case "$phase" in
    torch)
      [[ "$target" == runtime ]] || { echo "install.sh: phase torch is for the runtime target only" >&2; exit 2; }
      echo "install.sh: [$target] torch ($TORCH_VARIANT)" >&2
      index=()
      if [[ "$TORCH_VARIANT" == cpu ]]; then
        url="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
        [[ -n "$url" ]] && index=(--extra-index-url "$url")
      fi
      pip "${index[@]}" "$(torch_requirement)"
      ;;
    deps)
      echo "install.sh: [$target] third-party requirements (torch $TORCH_VARIANT, TensorRT $TENSORRT)" >&2
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
# ... and the CPU runtime image when something pulled the CUDA build over the CPU one.
if [[ "$target" == runtime && "$TORCH_VARIANT" == cpu && " ${phases[*]} " == *" deps "* ]] \
   && ! "$PYTHON" -c "import sys, importlib.metadata as m; sys.exit(not m.version('torch').endswith('+cpu'))"; then
  echo "install.sh: TORCH_VARIANT=cpu, but the installed torch is not the CPU build" >&2
  exit 1
fi
