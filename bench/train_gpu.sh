#!/usr/bin/env bash
# bench/train.py's short GPU version (< 4 min): the standard MONAI recipe for 2 minutes, then `mmar init` +
# `mmar train` for 1.2 minutes, on the GPU, one after the other (or each for BUDGET_MIN minutes when given);
# prints minutes to Dice 0.80/0.85/0.88, data-wait share and the ratios mmar/baseline. The defaults leave
# room for each recipe's 0.85 on an H200 (tutorial 1.6-1.75 min, epoch 23; mmar 0.45 min, and 0.88 at 1 min).
#
#   bench/train_gpu.sh [DATA_DIR] [BUDGET_MIN]
#
# DATA_DIR defaults to ../shared/data/hippocampus, else build/bench9/data/hippocampus (a copy carried to a
# device machine). Python: .venv/bin/python if there, else python3. Where monai / ignite / nibabel are
# missing (a bare GPU image), wheels in build/bench9/whl are installed into /tmp/site first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d build/bench9/whl monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2
# SLIM=1: both recipes see only the runtime image's packages (bench/slim_python.py), so that start-up is
# timed as in the image and not with a GPU machine's extra packages, which MONAI's import loads.
# Results: a /tmp/bench-train.* folder (results.json, bench.log, the MMAR), copied to $OUT when set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATA="${1:-}"
if [[ -z "$DATA" ]]; then
  for candidate in ../shared/data/hippocampus build/bench9/data/hippocampus; do
    [[ -f "$candidate/datalist.json" ]] && DATA="$candidate" && break
  done
fi
[[ -n "$DATA" ]] || { echo "no hippocampus datalist found; pass DATA_DIR" >&2; exit 2; }
BUDGETS=(--baseline-budget-min 2.0 --mmar-budget-min 1.2)
if [[ -n "${2:-}" ]]; then BUDGETS=(--budget-min "$2"); fi  # a recipe's own budget in BENCH_ARGS still wins
PYTHON=python3
[[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python

if ! "$PYTHON" -c "import monai, ignite, nibabel" 2>/dev/null; then
  # compiled at install (as pip does in the runtime image): without .pyc files every process of the
  # benchmark compiles MONAI and ignite from source again, about 1 s more start-up on a 2-core CPU
  "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site \
    build/bench9/whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ "${SLIM:-0}" == 1 ]]; then
  # time start-up as the runtime image would: hide the packages a kitchen-sink GPU image has beyond it
  "$PYTHON" bench/slim_python.py /tmp/mmar-slim-python
  export PYTHONPATH="/tmp/mmar-slim-python:$PYTHONPATH"
fi
"$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

WORK="$(mktemp -d /tmp/bench-train.XXXXXX)"
status=0
# BENCH_ARGS: extra bench/train.py arguments, e.g. BENCH_ARGS="--mmar-set train#num_workers=4" (experiments)
# shellcheck disable=SC2086
"$PYTHON" bench/train.py --device cuda "${BUDGETS[@]}" --data "$DATA" --out "$WORK" ${BENCH_ARGS:-} || status=$?
if [[ -n "${OUT:-}" ]]; then  # a device machine's result folder: the two result files only
  cp "$WORK/results.json" "$WORK/bench.log" "$OUT/" 2>/dev/null || true
fi
exit "$status"
