#!/usr/bin/env python
"""Time to a good segmentation model: the standard MONAI tutorial recipe against `mmar init`'s default.

In ONE run, on the same machine and data, one after the other:

  (a) baseline: the standard MONAI tutorial recipe, written here with MONAI directly: plain `Dataset` +
      `DataLoader` (2 workers); UNet 16-32-64-128-256, strides 2, 2 residual units (batch norm, as the
      tutorial); DiceCE; Adam 1e-3; batch 4 whole volumes padded to 48x64x48; random flips on the 3 axes;
      validation on the whole validation list every epoch (sliding window, one 48x64x48 window);
  (b) mmar: `mmar init --task segmentation --datalist ...` then the real `mmar train` CLI, in a subprocess,
      with the defaults that init wrote (nothing tuned per run).

Each runs in its own process for at most its time budget (killed after it). Logged per epoch: wall time,
training samples/s, data-wait share of the training time, peak resident memory of the process tree, and
validation Dice per class. Printed at the end: minutes (wall clock from the process start, validation and
start-up included) to validation mean Dice 0.80 / 0.85 / 0.88 for each recipe and the ratios mmar/baseline.

    python bench/train.py                                   # 15 min baseline, 30 min mmar, CPU or GPU
    python bench/train.py --budget-min 1.5 --device cuda    # GPU smoke (bench/train_gpu.sh)
    python bench/train.py --recipes mmar --mmar-set epochs=40   # experiment with overrides (not the default!)

`--mmar-patch NAME` applies a proposed engine change by monkeypatching inside the mmar process (see
PATCHES below), to measure it before it is written into `mmar/engine/`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hippocampus"
DEFAULT_BUDGETS_MIN = {"baseline": 15.0, "mmar": 30.0}
THRESHOLDS = (0.80, 0.85, 0.88)
MARK = "BENCH "  # a worker's per-epoch JSON record on stdout starts with this


# ---- memory of a process tree (no psutil needed) ---------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                found += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    return found


TICK = os.sysconf("SC_CLK_TCK")


def tree_usage(pid: int) -> tuple[int, float]:
    """(resident bytes, CPU seconds) of a process and its live descendants."""
    rss, cpu, stack, seen = 0, 0.0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/status", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{current}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
        stack += _children(current)
    return rss, cpu


class PeakSampler(threading.Thread):
    """Peak resident memory and CPU time of a process and its children (DataLoader workers), twice a second.

    CPU time is the figure to compare when the machine is shared: wall time depends on the neighbours.
    Workers that exit take their CPU time with them, so persistent workers are what this counts.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.cpu, self._stop = pid, 0, 0.0, threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            rss, cpu = tree_usage(self.pid)
            self.peak, self.cpu = max(self.peak, rss), max(self.cpu, cpu)
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()


# ---- worker (a): the standard MONAI tutorial recipe -------------------------------------------------


def _emit(record: dict) -> None:
    print(MARK + json.dumps(record), flush=True)


def _elapsed() -> float:
    return time.time() - float(os.environ["BENCH_T0"])


def baseline_worker(args) -> None:
    import torch
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet
    from monai.transforms import (
        AsDiscrete, Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd, RandFlipd,
        SpatialPadd,
    )
    from monai.utils import set_determinism

    set_determinism(seed=0)
    device = torch.device(args.device)
    datalist = json.loads((Path(args.data) / "datalist.json").read_text())

    def files(key):
        return [{k: str(Path(args.data) / item[k]) for k in ("image", "label")} for item in datalist[key]]

    keys = ["image", "label"]
    size = (48, 64, 48)
    common = [LoadImaged(keys), EnsureChannelFirstd(keys),
              NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]
    train_transforms = Compose([*common, SpatialPadd(keys, size),
                                *[RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)],
                                EnsureTyped(keys)])
    val_transforms = Compose([*common, EnsureTyped(keys)])
    train_files, val_files = files("training"), files("validation")
    train_loader = DataLoader(Dataset(train_files, train_transforms), batch_size=4, shuffle=True, num_workers=2,
                              pin_memory=device.type == "cuda", persistent_workers=True)
    val_loader = DataLoader(Dataset(val_files, val_transforms), batch_size=1, num_workers=2,
                            persistent_workers=True)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128, 256),
                 strides=(2, 2, 2, 2), num_res_units=2, norm=Norm.BATCH).to(device)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    dice = DiceMetric(include_background=False, reduction="mean_batch")
    post_pred, post_label = AsDiscrete(argmax=True, to_onehot=3), AsDiscrete(to_onehot=3)

    epoch = 0
    while True:
        epoch += 1
        model.train()
        started, wait, samples, losses = time.perf_counter(), 0.0, 0, []
        fetch = time.perf_counter()
        for batch in train_loader:
            wait += time.perf_counter() - fetch
            images, labels = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad()
            loss = loss_function(model(images), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            samples += images.shape[0]
            fetch = time.perf_counter()
        train_seconds = time.perf_counter() - started
        model.eval()
        val_started = time.perf_counter()
        with torch.no_grad():
            for batch in val_loader:
                images, labels = batch["image"].to(device), batch["label"].to(device)
                outputs = sliding_window_inference(images, size, 4, model)
                dice(y_pred=[post_pred(o) for o in decollate_batch(outputs)],
                     y=[post_label(lab) for lab in decollate_batch(labels)])
        per_class = [float(v) for v in dice.aggregate()]
        dice.reset()
        _emit({
            "epoch": epoch, "loss": sum(losses) / len(losses), "train_seconds": train_seconds,
            "val_seconds": time.perf_counter() - val_started, "samples_per_second": samples / train_seconds,
            "data_wait_fraction": wait / train_seconds, "dice_per_class": per_class,
            "mean_dice": sum(per_class) / len(per_class), "elapsed": _elapsed(),
        })


# ---- worker (b): the real `mmar train` CLI, instrumented -------------------------------------------


def _patch_bf16_autocast():
    """Proposed engine change: bf16 autocast on CPUs that have it (the engine's `amp` is CUDA-only today)."""
    import torch
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    for cls in (SupervisedTrainer, SupervisedEvaluator):
        original = cls._iteration

        def _iteration(self, engine, batch, _original=original):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _original(self, engine, batch)

        cls._iteration = _iteration


def _patch_channels_last():
    """Proposed engine change: channels-last 3D memory format for the network and its inputs."""
    import torch
    from mmar.engine import workflow

    original = workflow.KeyedBatch.__call__

    def __call__(self, batch, device=None, non_blocking=False, **kwargs):
        image, label = original(self, batch, device, non_blocking, **kwargs)
        return image.contiguous(memory_format=torch.channels_last_3d), label

    workflow.KeyedBatch.__call__ = __call__
    from monai.bundle import ConfigParser

    parsed = ConfigParser.get_parsed_content

    def get_parsed_content(self, id="", **kwargs):
        value = parsed(self, id, **kwargs)
        if id == "network":
            value = value.to(memory_format=torch.channels_last_3d)
        return value

    ConfigParser.get_parsed_content = get_parsed_content


PATCHES = {"bf16": _patch_bf16_autocast, "channels_last": _patch_channels_last}


def mmar_worker(args, cli_args: list[str]) -> None:
    """`mmar train` with hooks that time validation and print one record per epoch."""
    for name in args.mmar_patch:
        PATCHES[name]()
    from mmar.engine import handlers
    from mmar.tasks.segmentation import KEY_METRIC, per_class_dice

    timing = {"val_seconds": 0.0}
    validate = handlers.EpochValidation.__call__

    def timed_validation(self, trainer):
        started = time.perf_counter()
        validate(self, trainer)
        timing["val_seconds"] = time.perf_counter() - started

    handlers.EpochValidation.__call__ = timed_validation
    completed = handlers.EpochSummary._epoch_completed

    def summary(self, trainer):
        completed(self, trainer)
        record = dict(self.progress.history[-1])
        val_seconds, timing["val_seconds"] = timing["val_seconds"], 0.0
        # the engine's `seconds` spans the epoch's validation too: report training alone
        train_seconds = record["seconds"] - val_seconds
        record.update(train_seconds=train_seconds, val_seconds=val_seconds, elapsed=_elapsed(),
                      samples_per_second=self._samples / max(train_seconds, 1e-9),
                      data_wait_fraction=self._data_wait / max(train_seconds, 1e-9))
        if val_seconds and self.evaluator is not None:
            details = self.evaluator.state.metric_details.get(KEY_METRIC)
            if details is not None:
                record["dice_per_class"] = per_class_dice(details.cpu())
                record["mean_dice"] = record.get(KEY_METRIC)
        _emit(record)

    handlers.EpochSummary._epoch_completed = summary
    from mmar.cli import main

    sys.exit(main(cli_args))


# ---- the driver --------------------------------------------------------------------------------------


def run_worker(name: str, command: list[str], budget_s: float, env: dict, log_file) -> list[dict]:
    env = {**os.environ, **env, "BENCH_T0": repr(time.time()), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=ROOT, start_new_session=True)
    sampler = PeakSampler(process.pid)
    sampler.start()
    timer = threading.Timer(budget_s, lambda: _stop(process))
    timer.start()
    records = []
    for line in process.stdout:
        # seconds since the worker started: where its start-up goes (imports, caching, CUDA) can be read off
        log_file.write(f"[{name} {time.time() - float(env['BENCH_T0']):7.1f}s] {line}")
        log_file.flush()
        if not line.startswith(MARK):
            if "error" in line.lower() or "Traceback" in line:
                print(f"  [{name}] {line.rstrip()}", flush=True)
            continue
        record = json.loads(line[len(MARK):])
        record["peak_rss_gib"] = sampler.peak / 2**30
        record["cpu_seconds"] = max(sampler.cpu, tree_usage(process.pid)[1])
        records.append(record)
        print(f"  {name:8s} {_format_epoch(record)}", flush=True)
    process.wait()
    timer.cancel()
    sampler.stop()
    if process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL) and not records:
        raise SystemExit(f"{name} failed (exit {process.returncode}); see the log")
    return records


def _stop(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        time.sleep(10)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _format_epoch(r: dict) -> str:
    dice = r.get("dice_per_class")
    text = (f"epoch {r['epoch']:3d} {r['elapsed'] / 60:6.2f} min (cpu {r['cpu_seconds'] / 60:6.2f})  train {r['train_seconds']:5.1f}s "
            f"val {r['val_seconds']:4.1f}s  {r['samples_per_second']:5.1f} samples/s  "
            f"wait {100 * r['data_wait_fraction']:4.1f}%  rss {r['peak_rss_gib']:.2f} GiB  loss {r['loss']:.4f}")
    if dice:
        text += f"  Dice {r['mean_dice']:.4f} (" + " / ".join(f"{d:.4f}" for d in dice) + ")"
    return text


def startup_seconds(records: list[dict]) -> float:
    """Process start to the first epoch's start: imports, caching, workers, CUDA context."""
    if not records:
        return 0.0
    first = records[0]
    return max(0.0, first["elapsed"] - first["train_seconds"] - first["val_seconds"])


def minutes_to(records: list[dict], threshold: float):
    """(wall minutes, CPU minutes, epoch, loop minutes) at the first validation reaching `threshold`;
    loop minutes leave out the start-up (what a longer run amortizes)."""
    for r in records:
        if r.get("mean_dice") is not None and r["mean_dice"] >= threshold:
            return r["elapsed"] / 60, r["cpu_seconds"] / 60, r["epoch"], (r["elapsed"] - startup_seconds(records)) / 60
    return None, None, None, None


def summarize(results: dict[str, list[dict]]) -> dict:
    summary = {}
    for name, records in results.items():
        validated = [r for r in records if r.get("dice_per_class")]
        best = max(validated, key=lambda r: r["mean_dice"], default=None)
        train = [r for r in records if r["epoch"] > 1] or records  # epoch 1 carries warm-up
        summary[name] = {
            "epochs": len(records),
            "minutes": records[-1]["elapsed"] / 60 if records else None,
            "median_samples_per_second": _median([r["samples_per_second"] for r in train]),
            "median_data_wait_fraction": _median([r["data_wait_fraction"] for r in train]),
            "median_train_seconds": _median([r["train_seconds"] for r in train]),
            "median_val_seconds": _median([r["val_seconds"] for r in validated[1:] or validated]),
            "peak_rss_gib": max((r["peak_rss_gib"] for r in records), default=None),
            "best_mean_dice": best and best["mean_dice"],
            "best_dice_per_class": best and best["dice_per_class"],
            "best_epoch": best and best["epoch"],
            "best_minutes": best and best["elapsed"] / 60,
            "cpu_minutes": records[-1]["cpu_seconds"] / 60 if records else None,
            "startup_seconds": startup_seconds(records),
            "to": {f"{t:.2f}": dict(zip(("minutes", "cpu_minutes", "epoch", "loop_minutes"), minutes_to(records, t)))
                   for t in THRESHOLDS},
        }
    return summary


def final_validation(mmar_dir: Path, env: dict) -> dict | None:
    """`mmar validate` of the best model, as a user runs it after training (config_validation.json: the
    mirrored sliding window), timed; None when training left no model."""
    if not (mmar_dir / "models" / "model.ckpt").is_file():
        return None
    started = time.perf_counter()
    # the runtime first, then whatever the caller had (a bare GPU image's extra site folder)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "runtime"), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "mmar", "validate", str(mmar_dir)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": pythonpath, **env})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(f"final validation failed:\n{done.stderr[-2000:]}", flush=True)
        return None
    metrics = json.loads((mmar_dir / "eval" / "metrics.json").read_text())
    return {"mean_dice": metrics["val_mean_dice"], "dice_per_class": list(metrics.get("dice_per_class", {}).values()),
            "seconds": seconds, "inferer": json.loads((mmar_dir / "config" / "config_validation.json").read_text())
            ["validate"]["inferer"]["_target_"]}


def _median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def print_summary(summary: dict) -> None:
    print("\nstart-up (imports, caching, workers) before the first epoch: "
          + ", ".join(f"{n} {s['startup_seconds']:.0f} s" for n, s in summary.items()))
    print("\nrecipe     epochs  samples/s  data wait  train s/epoch  val s  peak RSS  best mean Dice (per class)")
    for name, s in summary.items():
        if not s["epochs"]:
            print(f"{name:10s} no epoch finished")
            continue
        per_class = " / ".join(f"{d:.4f}" for d in s["best_dice_per_class"] or [])
        print(f"{name:10s} {s['epochs']:6d}  {s['median_samples_per_second']:9.1f}  "
              f"{100 * s['median_data_wait_fraction']:8.1f}%  {s['median_train_seconds']:13.1f}  "
              f"{s['median_val_seconds'] or 0:5.1f}  {s['peak_rss_gib']:6.2f} GiB  {s['best_mean_dice'] or 0:.4f} "
              f"({per_class}) at epoch {s['best_epoch']}, {s['best_minutes'] or 0:.1f} min")
    final = summary.get("mmar", {}).get("final_validation")
    if final:
        print(f"\nmmar validate (best model, {final['inferer'].rsplit('.', 1)[-1]}): mean Dice {final['mean_dice']:.4f} ("
              + " / ".join(f"{d:.4f}" for d in final["dice_per_class"]) + f") in {final['seconds']:.0f} s")
    print("\nminutes to validation mean Dice: wall clock (CPU time of the process tree) [epoch]")
    names = list(summary)
    both = {"baseline", "mmar"} <= set(summary)
    print("threshold  " + "  ".join(f"{n:>24s}" for n in names) + ("   ratio mmar/baseline: wall (CPU)" if both else ""))
    for t in THRESHOLDS:
        cells = []
        for name in names:
            reached = summary[name]["to"][f"{t:.2f}"]
            cells.append(f"{reached['minutes']:6.2f} ({reached['cpu_minutes']:6.2f}) [{reached['epoch']:3d}]"
                         if reached["minutes"] is not None else "not reached")
        line = f"{t:9.2f}  " + "  ".join(f"{c:>24s}" for c in cells)
        if both:
            a, b = summary["baseline"]["to"][f"{t:.2f}"], summary["mmar"]["to"][f"{t:.2f}"]
            if a["minutes"] and b["minutes"]:
                line += (f"   {b['minutes'] / a['minutes']:.2f} ({b['cpu_minutes'] / a['cpu_minutes']:.2f});"
                         f" without start-up {b['loop_minutes'] / a['loop_minutes']:.2f}")
            elif b["minutes"]:  # the baseline never got there within its budget: an upper bound
                line += f"   < {b['minutes'] / summary['baseline']['minutes']:.2f} (baseline not reached)"
            else:
                line += "   -"
        print(line)


def recipe_budgets(common: float | None, own: dict[str, float | None]) -> dict[str, float]:
    """Minutes per recipe: a recipe's own budget, else the common one, else its default. (The common budget
    used to replace both own budgets, so `bench/train_gpu.sh`'s BUDGET silently overrode a BENCH_ARGS
    `--mmar-budget-min`.)"""
    return {name: next(b for b in (minutes, common, DEFAULT_BUDGETS_MIN[name]) if b is not None)
            for name, minutes in own.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with datalist.json (default: %(default)s)")
    parser.add_argument("--recipes", default="baseline,mmar", help="comma-separated: baseline, mmar")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="time budget of each recipe without its own --RECIPE-budget-min (minutes)")
    parser.add_argument("--baseline-budget-min", type=float, default=None,
                        help=f"the tutorial recipe's budget (default: --budget-min, else {DEFAULT_BUDGETS_MIN['baseline']})")
    parser.add_argument("--mmar-budget-min", type=float, default=None,
                        help=f"mmar's budget (default: --budget-min, else {DEFAULT_BUDGETS_MIN['mmar']})")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--parallel", action="store_true",
                        help="run the recipes at the same time, not one after the other: on a machine shared with "
                             "other work, both then see the same neighbours (compare ratios, not minutes)")
    parser.add_argument("--out", default=None, help="work folder (MMAR, log, results.json); default a temp folder")
    parser.add_argument("--mmar-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `--set` override for mmar train (experiments; the benchmark uses none)")
    parser.add_argument("--mmar-patch", action="append", default=[], choices=sorted(PATCHES),
                        help="monkeypatch a proposed engine change into the mmar process")
    parser.add_argument("--no-final-validation", action="store_true",
                        help="skip `mmar validate` of the best model after mmar's training")
    parser.add_argument("--summarize", metavar="RESULTS_JSON", help="print the summary of an earlier run's results.json")
    parser.add_argument("--worker", choices=["baseline", "mmar"], help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.summarize:
        data = json.loads(Path(args.summarize).read_text())
        summary = summarize(data["epochs"])
        final = data.get("summary", {}).get("mmar", {}).get("final_validation")
        if final and "mmar" in summary:
            summary["mmar"]["final_validation"] = final
        print_summary(summary)
        return 0
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker == "baseline":
        baseline_worker(args)
        return 0
    if args.worker == "mmar":
        mmar_worker(args, [a for a in rest if a != "--"])
        return 0

    import tempfile

    out = Path(args.out or tempfile.mkdtemp(prefix="mmar-bench-train-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    datalist = Path(args.data) / "datalist.json"
    if not datalist.is_file():
        raise SystemExit(f"no datalist at {datalist}")
    budgets = recipe_budgets(args.budget_min, {"baseline": args.baseline_budget_min, "mmar": args.mmar_budget_min})
    env = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
    import torch

    print(f"data {args.data}; device {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{os.cpu_count()} CPUs; budgets (min) {budgets}; work folder {out}", flush=True)
    results: dict[str, list[dict]] = {}
    commands: dict[str, str] = {}
    jobs: dict[str, tuple[list[str], float]] = {}
    with open(out / "bench.log", "w", encoding="utf-8") as log_file:
        for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
            print(f"== {name} (budget {budgets[name]} min)", flush=True)
            own = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--data", args.data,
                   "--device", args.device, *sum((["--mmar-patch", p] for p in args.mmar_patch), [])]
            if name == "mmar":
                mmar_dir = out / "mmar"
                init = [sys.executable, "-m", "mmar", "init", str(mmar_dir), "--task", "segmentation",
                        "--datalist", str(datalist), "--force"]
                subprocess.run(init, check=True, cwd=ROOT)
                for stale in ("train_state.pt", "model.ckpt"):
                    (mmar_dir / "models" / stale).unlink(missing_ok=True)
                cli = ["train", str(mmar_dir)] + (["--set", *args.mmar_set] if args.mmar_set else [])
                commands[name] = " ".join(init[1:]) + " && mmar " + " ".join(cli)
                own += ["--", *cli]
            else:
                commands[name] = "baseline_worker (MONAI tutorial recipe, this file)"
            jobs[name] = (own, budgets[name] * 60)
        if args.parallel:
            threads = [threading.Thread(target=lambda n=n, j=j: results.__setitem__(n, run_worker(n, *j, env, log_file)))
                       for n, j in jobs.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            results = {name: results.get(name, []) for name in jobs}
        else:
            for name, job in jobs.items():
                results[name] = run_worker(name, *job, env, log_file)
    summary = summarize(results)
    if "mmar" in jobs and not args.no_final_validation:
        final = final_validation(out / "mmar", env)
        if final:
            summary["mmar"]["final_validation"] = final
    print_summary(summary)
    with open(out / "results.json", "w", encoding="utf-8") as handle:
        json.dump({"args": vars(args), "budgets_min": budgets, "commands": commands, "summary": summary,
                   "epochs": results}, handle, indent=1)
    print(f"\nper-epoch records and summary: {out / 'results.json'}; worker output: {out / 'bench.log'}")
    return 0


if __name__ == "__main__":
    # this benchmark swaps whole components (`_target_`, `$` expressions) through --set, which mmar refuses
    # unless asked (docs/security.md): its subprocesses inherit the opt-in (set here, not at import: tests import it)
    os.environ.setdefault("MMAR_ALLOW_EXPRESSIONS", "1")
    sys.exit(main())
