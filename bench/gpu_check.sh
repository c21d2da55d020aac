#!/usr/bin/env bash
# GPU check of the export path (issue 5): TensorRT fp32/fp16 engines from a model with the default
# segmentation recipe, validation through them, and bench/infer.py with every format. Under 4 minutes on
# an H100/H200; needs no internet and installs nothing: it prints what is missing and goes on without it.
#
#   bash bench/gpu_check.sh              # from the repository root
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#   BENCH_DATA=/data/hippocampus/datalist.json bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "MISSING: nvidia-smi (no NVIDIA driver?)"
"$PY" - <<'PY'
import importlib
need = {"torch": "required", "monai": "required (pip install 'monai[ignite,nibabel]==1.6.1')",
        "ignite": "required (pip install pytorch-ignite)", "nibabel": "required", "onnx": "required",
        "onnxscript": "required by torch.onnx.export(dynamo=True)", "onnxruntime": "required",
        "tensorrt": "optional: TensorRT engines (pip install tensorrt-cu12 or tensorrt-cu13, matching CUDA)"}
for name, why in need.items():
    try:
        module = importlib.import_module(name)
        print(f"  {name:<12} {getattr(module, '__version__', '?')}")
    except Exception as error:
        print(f"  MISSING {name:<12} {why}  [{type(error).__name__}: {str(error)[:80]}]")
import torch
print(f"  cuda available: {torch.cuda.is_available()}, torch cuda {torch.version.cuda}")
try:
    import onnxruntime as ort
    providers = ort.get_available_providers()
    print(f"  onnxruntime providers: {providers}")
    if "CUDAExecutionProvider" not in providers:
        print("  NOTE: onnxruntime has no CUDA provider (pip install onnxruntime-gpu for ONNX Runtime on the GPU)")
except Exception:
    pass
PY
"$PY" -c "import torch, monai, ignite, nibabel, onnx, onnxruntime, onnxscript" 2>/dev/null \
  || { echo "cannot go on without the required packages above"; exit 1; }

echo "== an MMAR with the default segmentation recipe and random weights (nothing is trained)"
"$PY" -m mmar demo-data "$WORK/data" --cases 8 --size 48 >/dev/null || exit 1
"$PY" -m mmar init "$WORK/mmar" --datalist "$WORK/data/datalist.json" >/dev/null || exit 1
"$PY" - "$WORK/mmar" <<'PY' || exit 1
import sys, torch
from mmar.archive import load_archive
from mmar.engine import checkpoint
archive = load_archive(sys.argv[1])
torch.manual_seed(0)
network = archive.parser().get_parsed_content("network")
checkpoint.save_model(archive.models_dir / checkpoint.MODEL_FILE, network, epoch=0, note="random weights")
print("  network", archive.config["network"]["_target_"], "spatial_size", archive.config["spatial_size"])
PY

echo "== mmar export (torchscript, onnx, tensorrt fp16), then tensorrt fp32"
time "$PY" -m mmar export "$WORK/mmar" --precision fp16
"$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); [print('  ', k, {x: v.get(x) for x in ('max_abs_diff','tolerance','precision','skipped') if x in v}) for k, v in r['formats'].items()]" "$WORK/mmar/models/export.json"
if "$PY" -c "import tensorrt" 2>/dev/null; then
  cp "$WORK/mmar/models/model.trt" "$WORK/model-fp16.trt" 2>/dev/null
  time "$PY" -m mmar export "$WORK/mmar" --formats tensorrt --precision fp32
  echo "== mmar validate through each format (metrics must agree; random weights, so the value itself is low)"
  for model in ckpt ts onnx trt; do
    "$PY" -m mmar validate "$WORK/mmar" --model "$model" 2>&1 | tail -1 | sed "s/^/  $model: /"
  done
  "$PY" -m mmar validate "$WORK/mmar" --model trt --ckpt "$WORK/model-fp16.trt" 2>&1 | tail -1 | sed "s/^/  trt fp16: /"
else
  echo "  (tensorrt not installed: engines skipped; validating ckpt/ts/onnx only)"
  for model in ckpt ts onnx; do
    "$PY" -m mmar validate "$WORK/mmar" --model "$model" 2>&1 | tail -1 | sed "s/^/  $model: /"
  done
fi

echo "== bench/infer.py on the GPU (eager, TorchScript, ONNX Runtime, TensorRT fp32/fp16)"
DATA="${BENCH_DATA:-../shared/data/hippocampus/datalist.json}"
time "$PY" bench/infer.py --device cuda --data "$DATA" --cases 8 --repeats 3 --sw-batch 4
