#!/usr/bin/env bash
# Data-parallel training throughput on this machine's GPUs (under 3 minutes on an H100/H200).
#
#   bash bench/ddp_gpu.sh            # PYTHON=/path/to/python to pick the interpreter (default .venv's)
#
# Generates a synthetic 3D segmentation set, trains the default recipe (UNet 16..256, AMP, random
# 64^3 patches, batch 2 per process) for a few epochs with validation only after the last one, and prints
# the median training samples/s over epochs 2..E-1 (epoch 1 pays cuDNN autotuning and worker start-up;
# the last one pays validation). With more than one visible GPU it also trains with `--gpus N` (NCCL,
# one process per GPU, the same per-process batch, so N times the global batch) and prints the ratio to
# the 1-process run measured here and the scaling efficiency (ratio / N). The numbers are global samples
# per second, summed over the ranks. On one GPU only the 1-process figure is measured: NCCL cannot put
# two ranks on the same device, so scaling needs several GPUs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
EPOCHS="${EPOCHS:-6}"
CASES="${CASES:-40}"
SIZE="${SIZE:-64}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mmar-ddp-bench.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none")
EOF
NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$NGPU" -lt 1 ]; then
    echo "no CUDA device: nothing to measure (the CPU path is covered by tests/test_distributed.py)" >&2
    exit 1
fi

"$PYTHON" -m mmar demo-data "$WORK/data" --cases "$CASES" --size "$SIZE" --seed 0 >/dev/null
SETTINGS=(epochs="$EPOCHS" num_training_epoch_per_valid="$EPOCHS" "spatial_size=[64,64,64]"
          train#batch_size=2 train#samples_per_volume=2 train#num_workers=4)

run() {  # run NAME [--gpus N]: train a fresh MMAR, print its summary line, leave its history
    local name="$1"; shift
    "$PYTHON" -m mmar init "$WORK/$name" --task segmentation --datalist "$WORK/data/datalist.json" \
        --epochs "$EPOCHS" >/dev/null
    local started=$SECONDS
    "$PYTHON" -m mmar train "$WORK/$name" "$@" --set "${SETTINGS[@]}" >"$WORK/$name.log" 2>&1 \
        || { cat "$WORK/$name.log" >&2; exit 1; }
    "$PYTHON" - "$WORK/$name/models/train_state.pt" "$name" "$((SECONDS - started))" <<'EOF'
import statistics, sys, torch
history = torch.load(sys.argv[1], weights_only=False)["progress"]["history"]
steady = history[1:-1] or history
rate = statistics.median(r["samples_per_second"] for r in steady)
wait = statistics.median(r["data_wait_fraction"] for r in steady)
print(f"{sys.argv[2]:>12}: {rate:8.1f} samples/s (median of epochs {steady[0]['epoch']}..{steady[-1]['epoch']}), "
      f"data wait {wait:.0%} of rank 0's epoch, final loss {history[-1]['loss']:.3f}, "
      f"{history[-1].get('val_mean_dice', float('nan')):.3f} val_mean_dice, wall {sys.argv[3]} s")
open(sys.argv[1] + ".rate", "w").write(str(rate))
EOF
}

run "1-process"
if [ "$NGPU" -gt 1 ]; then
    run "$NGPU-process" --gpus "$NGPU"
    "$PYTHON" - "$WORK/1-process/models/train_state.pt.rate" "$WORK/$NGPU-process/models/train_state.pt.rate" "$NGPU" <<'EOF'
import sys
one, many, n = float(open(sys.argv[1]).read()), float(open(sys.argv[2]).read()), int(sys.argv[3])
print(f"{n} processes / 1 process: {many / one:.2f}x samples/s, scaling efficiency {many / one / n:.0%}")
EOF
else
    echo "1 GPU visible: the 1-vs-N comparison needs several GPUs (not measured)"
fi
