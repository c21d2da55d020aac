"""Sliding-window inference speed of every model format, on the same volumes, in one run.

    python bench/infer.py                       # ../shared/data/hippocampus (or generated volumes), CPU
    python bench/infer.py --mmar path/to/mmar   # that MMAR's network, weights and sliding-window settings
    python bench/infer.py --device cuda         # adds TensorRT fp32 / fp16 where `tensorrt` is installed

Formats: PyTorch eager (the baseline), eager under the config's `amp` as `mmar validate` / `mmar infer` run a
checkpoint (`eager-amp`: bf16 autocast on a CPU or GPU with native bf16, fp16 on older GPUs), TorchScript, ONNX Runtime (CUDA provider on a GPU when
onnxruntime-gpu is installed, else CPU), TensorRT fp32 and fp16. Each is exported with the same code as
`mmar export` (into a temp folder: nothing is trained, nothing in an MMAR is written) and run through the
same predictor `mmar validate --model` uses, inside MONAI's SlidingWindowInferer. Torch and ONNX Runtime
get the same number of threads. Printed: median latency per volume, throughput (volumes/s over a whole
pass), each as a ratio against PyTorch eager, and the max abs difference of each format's output from
eager's on the first volume (the formats must do the same work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hippocampus" / "datalist.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mmar", help="an MMAR: its network, models/model.ckpt (random weights if absent), ROI")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="datalist JSON (its 'validation' images) or a folder of .nii.gz (default: hippocampus; "
                        "generated volumes when it does not exist)")
    parser.add_argument("--cases", type=int, default=8, help="volumes per pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the volumes (after one warm-up)")
    parser.add_argument("--roi", help="sliding-window ROI, e.g. 48,64,48 (default: the MMAR's or the data's patch size)")
    parser.add_argument("--sw-batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime alike")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--formats", default="eager,eager-amp,ts,onnx,trt-fp32,trt-fp16",
                        help="comma-separated subset of eager,eager-amp,ts,onnx,trt-fp32,trt-fp16")
    parser.add_argument("--ort-optimization", default="all", choices=["disable", "basic", "extended", "all"])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


# ---- inputs ----------------------------------------------------------------------------------------


def load_volumes(data: str, cases: int) -> tuple[list[torch.Tensor], str]:
    """[1, 1, X, Y, Z] z-scored volumes (nonzero voxels, as the recipe's NormalizeIntensityd)."""
    import nibabel as nib

    path = Path(data)
    files: list[Path] = []
    if path.is_file():
        datalist = json.loads(path.read_text())
        items = datalist.get("validation") or datalist.get("training") or []
        files = [path.parent / (i["image"] if isinstance(i["image"], str) else i["image"][0]) for i in items]
    elif path.is_dir():
        files = sorted(path.glob("**/*.nii.gz"))
    volumes, source = [], ""
    if files:
        for file in files[:cases]:
            array = np.asarray(nib.load(str(file)).dataobj, dtype=np.float32)
            volumes.append(torch.from_numpy(_zscore(array))[None, None])
        source = f"{len(volumes)} volumes from {path}"
    else:
        from mmar.synthetic import segmentation_case

        rng = np.random.default_rng(0)
        volumes = [torch.from_numpy(_zscore(segmentation_case(48, rng)[0]))[None, None] for _ in range(cases)]
        source = f"{cases} generated 48x52x46 volumes ({data} not found)"
    return volumes, source


def _zscore(array: np.ndarray) -> np.ndarray:
    mask = array != 0
    values = array[mask] if mask.any() else array
    out = np.zeros_like(array) if mask.any() else array.copy()
    out[mask] = (array[mask] - values.mean()) / max(float(values.std()), 1e-8)
    return out


def build_network(args, volumes):
    """(network, roi, description): the MMAR's, or the default segmentation recipe's with random weights."""
    from monai.bundle import ConfigParser

    from mmar.tasks import segmentation

    if args.mmar:
        from mmar.archive import load_archive
        from mmar.predict import default_checkpoint, load_network

        archive = load_archive(args.mmar, for_validation=True)
        roi = _roi(args.roi) or [int(s) for s in archive.parser().get_parsed_content("spatial_size")]
        if default_checkpoint(archive).is_file():
            return load_network(archive), roi, f"{args.mmar} ({default_checkpoint(archive).name})"
        torch.manual_seed(0)
        return archive.parser().get_parsed_content("network").eval(), roi, f"{args.mmar} network, random weights"
    roi = _roi(args.roi) or segmentation.patch_size([tuple(v.shape[2:]) for v in volumes])
    train, _ = segmentation.default_configs(num_classes=3, in_channels=1, spatial_size=roi)
    torch.manual_seed(0)
    network = ConfigParser({"num_classes": 3, "network": train["network"]}).get_parsed_content("network").eval()
    return network, roi, "the default segmentation UNet (mmar init), random weights"


def _roi(text):
    return [int(v) for v in text.split(",")] if text else None


# ---- formats ---------------------------------------------------------------------------------------


def make_predictors(args, network, roi, folder: Path, device: torch.device):
    from mmar import export as exporter
    from mmar.predict import load_file, tensorrt_unavailable

    wanted = [f.strip() for f in args.formats.split(",") if f.strip()]
    shape = [args.sw_batch, 1, *roi]
    inputs = exporter.sample_inputs([1, 1, *roi], dynamic_spatial=False)
    predictors, notes = {}, []
    if "eager" in wanted:
        predictors["eager"] = network.to(device)
    if "eager-amp" in wanted:
        from mmar.engine import precision

        run = precision.for_device(network.to(device), device, amp=True)  # what `mmar validate` picks
        if not run.cuda_amp and run.network is network:
            notes.append(f"eager-amp: skipped: {run.name}")
        else:
            predictors["eager-amp"] = (precision.Autocast(run.network, "cuda", run.amp_kwargs["dtype"])
                                     if run.cuda_amp else run.network)  # MONAI's evaluator autocasts CUDA itself
            notes.append(f"eager-amp: {run.amp_kwargs.get('dtype', torch.bfloat16)} autocast")  # the CPU's is bf16
    if "ts" in wanted:
        exporter.write_torchscript(network.cpu(), inputs, folder / "model.ts", dynamic_spatial=False)
        predictors["ts"] = load_file(folder / "model.ts", "ts", device)
    onnx_file = folder / "model.onnx"
    if any(f == "onnx" or f.startswith("trt") for f in wanted):
        info = exporter.write_onnx(network.cpu(), inputs, onnx_file, dynamic_spatial=True, log=notes.append)
        notes.append(f"onnx: opset {info['opset']}, input dims {info['input_dims']}")
    if "onnx" in wanted:
        onnx_predictor = load_file(onnx_file, "onnx", device, threads=torch.get_num_threads(),
                                   optimization=args.ort_optimization)
        predictors["onnx"] = onnx_predictor
        notes.append(f"onnx runtime {__import__('onnxruntime').__version__}: {onnx_predictor.providers[0]}")
    for precision in ("fp32", "fp16"):
        name = f"trt-{precision}"
        if name not in wanted:
            continue
        reason = tensorrt_unavailable()
        if reason:
            notes.append(f"{name}: skipped: {reason}")
            continue
        engine = folder / f"model-{precision}.trt"
        exporter.build_tensorrt(onnx_file, engine, precision=precision, input_shape=shape, max_batch=args.sw_batch,
                                log=notes.append)
        predictors[name] = load_file(engine, "trt", device)
    network.to(device)
    return predictors, notes


# ---- timing ----------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pass(predictor, inferer, volumes, device) -> tuple[list[float], float, torch.Tensor]:
    latencies, first = [], None
    started = time.perf_counter()
    with torch.inference_mode():
        for volume in volumes:
            t0 = time.perf_counter()
            out = inferer(volume.to(device), predictor)
            sync(device)
            latencies.append(time.perf_counter() - t0)
            if first is None:
                first = out.float().cpu()
    return latencies, time.perf_counter() - started, first


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU", file=sys.stderr)
        return 2
    from monai.inferers import SlidingWindowInferer

    volumes, source = load_volumes(args.data, args.cases)
    network, roi, described = build_network(args, volumes)
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=args.sw_batch, overlap=args.overlap, mode="gaussian")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"data: {source}")
    print(f"model: {described}; ROI {roi}, sw_batch {args.sw_batch}, overlap {args.overlap}")
    print(f"device: {device} (GPU: {gpu}); torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        predictors, notes = make_predictors(args, network, roi, Path(folder), device)
        for note in notes:
            print(note)
        for name, predictor in predictors.items():  # warm-up: allocations, profiling executors, engine tuning
            run_pass(predictor, inferer, volumes[:2], device)
        results = {name: {"latencies": [], "totals": [], "first": None} for name in predictors}
        # passes interleave the formats, so that load from other processes hits all of them alike
        for repeat in range(args.repeats):
            for name, predictor in predictors.items():
                lat, total, out = run_pass(predictor, inferer, volumes, device)
                entry = results[name]
                entry["latencies"] += lat
                entry["totals"].append(total)
                entry["first"] = out if entry["first"] is None else entry["first"]
            print(f"  pass {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{n} {results[n]['totals'][-1]:.2f}s" for n in predictors), flush=True)
        for entry in results.values():
            entry["latency_ms"] = statistics.median(entry["latencies"]) * 1000
            entry["throughput"] = len(volumes) / statistics.median(entry["totals"])
    base = results.get("eager")
    print()
    print(f"{'format':<10} {'latency ms (median)':>20} {'volumes/s':>10} {'speed-up vs eager':>18} {'max |diff|':>11}")
    report = {"device": str(device), "gpu": gpu, "threads": torch.get_num_threads(), "roi": roi,
              "sw_batch": args.sw_batch, "data": source, "formats": {}}
    for name, r in results.items():
        ratio = base["latency_ms"] / r["latency_ms"] if base else float("nan")
        diff = float((r["first"] - base["first"]).abs().max()) if base else float("nan")
        print(f"{name:<10} {r['latency_ms']:>20.1f} {r['throughput']:>10.2f} {ratio:>17.2f}x {diff:>11.2e}")
        report["formats"][name] = {"latency_ms": r["latency_ms"], "volumes_per_s": r["throughput"],
                                   "speedup_vs_eager": ratio, "max_abs_diff_vs_eager": diff}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
