#!/usr/bin/env python
"""2D classification recipes side by side on the shared data (issue 23): the default `mmar init` writes
against candidates, through the real CLI (`mmar init`, `mmar train --set ...`, `mmar validate`).

Two splits, so that the figures reported are not tuned on the split the recipe was chosen by:

  dev    the shared `training` list cut in two (80 % to train, 20 % held out, stratified on the label
         list, fixed seed): candidates are compared on the held-out fifth; the shared `validation` list
         is not read at all.
  final  the shared `training` list to train, the shared `validation` list to report on (data the
         recipe choice never saw).

Per run: per-epoch wall time with the 1-minute load average beside it, training loss, validation AUC and
accuracy (from the run's history); then `mmar validate` of `model.ckpt` (best epoch on the validation
list, the project's rule) and of `model_final.ckpt` (the last epoch: no choice made on the validation
list, so its figure is not biased by the pick); and the late-epoch swing of the validation AUC (max - min
over the last third of the epochs).

    python bench/train_classification.py --split dev --recipes current,resnet18_ema --seeds 0
    python bench/train_classification.py --split final --recipes default --seeds 0,1,2   # the table
    python bench/train_classification.py --default-only                 # re-time just the default, 1 seed
    python bench/train_classification.py --quick                        # 3 epochs, smoke

`--out DIR` keeps every MMAR and `results.jsonl` (one JSON record per run, appended as each finishes).
Recipes are `--set` overrides of `mmar init`'s defaults; `current` spells out the recipe before issue 23
so that it stays reproducible now that the defaults changed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = {"breastmnist": DATA / "breastmnist", "nih": DATA / "nih-cxr"}
MMAR = [sys.executable, "-m", "mmar"]
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) ")


def _set(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


# the recipe before issue 23: DenseNet121 from scratch, 30 epochs of batch 32, AdamW 1e-3 + cosine,
# no weight average, small affine + intensity augmentation
OLD_AUGMENTATION = [
    {"_target_": "RandAffined", "keys": "@image_key", "prob": 0.5, "rotate_range": 0.1, "scale_range": 0.1,
     "padding_mode": "zeros"},
    {"_target_": "RandScaleIntensityd", "keys": "@image_key", "factors": 0.1, "prob": 0.5},
    {"_target_": "RandShiftIntensityd", "keys": "@image_key", "offsets": 0.1, "prob": 0.5},
]
DENSENET = {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 2, "in_channels": 1,
            "out_channels": "$sum(@label_format)"}


def resnet(depth: int = 18, widths=(64, 128, 256, 512), stem_stride: int = 1, max_pool: bool = True) -> dict:
    """MONAI's ResNet (basic blocks for 18/34) with a 3x3 stem, sized to small images."""
    layers = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
    return {"_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": layers,
            "block_inplanes": list(widths), "spatial_dims": 2, "n_input_channels": 1,
            "conv1_t_size": 3, "conv1_t_stride": stem_stride, "no_max_pool": not max_pool,
            "num_classes": "$sum(@label_format)"}


# the default of session 20 (before DenseNet121 + mixup): ResNet-18 with a stem sized to the image (3x3
# stride 1 up to 32 px, ImageNet's 7x7 stride 2 above), as `network_for` wrote it then
RESNET18_SIZED = {**resnet(18), "conv1_t_size": "$3 if max(@spatial_size) <= 32 else 7",
                  "conv1_t_stride": "$1 if max(@spatial_size) <= 32 else 2"}
NEW_AUGMENTATION = OLD_AUGMENTATION  # the affine + intensity steps are unchanged since issue 23 began
MIXUP = {"alpha": 0.4}

FLIP_H = {"_target_": "RandFlipd", "keys": "@image_key", "prob": 0.5, "spatial_axis": 1}


def with_flip(steps):
    return [FLIP_H, *steps]


# candidate name -> --set overrides on top of what `mmar init` writes now. Every candidate spells out
# the network, EMA and augmentation so that its meaning does not move when the defaults move.
def candidates() -> dict[str, list[str]]:
    from mmar.tasks.classification import augmentation as current_aug  # the default now

    new_aug = current_aug()
    spelled_out = {
        "current": [_set("network", DENSENET), _set("train#ema", None), _set("train#augmentation", OLD_AUGMENTATION),
                    _set("epochs", 30), _set("learning_rate", 1e-3), _set("train#batch_size", 32)],
        "densenet_ema": [_set("network", DENSENET), _set("train#ema", {"decay": 0.99}),
                         _set("train#augmentation", OLD_AUGMENTATION)],
        "resnet18": [_set("network", resnet(18)), _set("train#ema", None), _set("train#augmentation", OLD_AUGMENTATION)],
        "resnet18_ema": [_set("network", resnet(18)), _set("train#ema", {"decay": 0.99}),
                         _set("train#augmentation", OLD_AUGMENTATION)],
        "resnet18_ema_flip": [_set("network", resnet(18)), _set("train#ema", {"decay": 0.99}),
                              _set("train#augmentation", with_flip(OLD_AUGMENTATION))],
        "resnet10_ema": [_set("network", resnet(10)), _set("train#ema", {"decay": 0.99}),
                         _set("train#augmentation", OLD_AUGMENTATION)],
        "resnet18_half_ema": [_set("network", resnet(18, widths=(32, 64, 128, 256))), _set("train#ema", {"decay": 0.99}),
                              _set("train#augmentation", OLD_AUGMENTATION)],
        "resnet18_sized_ema": [_set("network", RESNET18_SIZED), _set("train#ema", {"decay": 0.99}),
                               _set("train#augmentation", NEW_AUGMENTATION), _set("train#mixup", None)],
        "resnet18_sized_ema_mixup": [_set("network", RESNET18_SIZED), _set("train#ema", {"decay": 0.99}),
                                     _set("train#augmentation", NEW_AUGMENTATION), _set("train#mixup", MIXUP)],
        "densenet_ema_mixup": [_set("network", DENSENET), _set("train#ema", {"decay": 0.99}),
                               _set("train#augmentation", OLD_AUGMENTATION), _set("train#mixup", MIXUP)],
        "densenet_ema_mixup_ema998": [_set("network", DENSENET), _set("train#ema", {"decay": 0.998}),
                                      _set("train#augmentation", OLD_AUGMENTATION), _set("train#mixup", MIXUP)],
    }
    # recipes spelled out in full train without mixup unless they say so (it is a default now:
    # docs/classification.md, "The default recipe and why");
    # the `default*` ones below are "what `mmar init` writes, with one change"
    for overrides in spelled_out.values():
        if not any(o.startswith("train#mixup=") for o in overrides):
            overrides.append(_set("train#mixup", None))
    return {**spelled_out,
        "default": [],  # exactly what `mmar init` writes now
        "default_flip": [_set("train#augmentation", with_flip(new_aug))],
        "default_noaug": [_set("train#augmentation", [])],
        "default_wd5e-2": [_set("train#optimizer#weight_decay", 0.05)],
        "default_lr3e-3": [_set("learning_rate", 3e-3)],
        "default_lr3e-4": [_set("learning_rate", 3e-4)],
        # issue 35: the image grid spelled out (mmar init picks 64 px for images up to 64 px since then)
        "default_32px": [_set("spatial_size", [32, 32])],
        "default_64px": [_set("spatial_size", [64, 64])],
    }


# ---- data splits ---------------------------------------------------------------------------------


def absolute(items: list[dict], base: Path) -> list[dict]:
    return [{**item, "image": str((base / item["image"]).resolve())} for item in items]


NIH_NAME = re.compile(r"^(\d{8})_\d{3}\.png$")  # ChestX-ray14: <patient>_<follow-up>.png


def patient_of(item: dict) -> str:
    """The patient an image belongs to where the file name says (ChestX-ray14), else the image itself.

    The NIH sample holds 600 training images of 165 patients: held-out images of a patient whose other
    images were trained on would make the held-out figures a test of memory.
    """
    name = Path(item["image"]).name
    match = NIH_NAME.match(name)
    return match.group(1) if match else item["image"]


def label_groups(items: list[dict]) -> dict[str, list[str]]:
    """The patients of each group of identical label lists (a patient's label list: its first image's)."""
    patients: dict[str, list[dict]] = {}
    for item in items:
        patients.setdefault(patient_of(item), []).append(item)
    groups: dict[str, list[str]] = {}
    for patient, images in patients.items():
        groups.setdefault(json.dumps(images[0]["label"]), []).append(patient)
    return groups


def stratified_holdout(items: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the patients of each group of identical label lists (by a patient's first
    image; at least one of a group of 2+); all images of a patient land on the same side."""
    groups = label_groups(items)
    rng = random.Random(seed)
    held_patients: set[str] = set()
    for key in sorted(groups):
        group = sorted(groups[key])
        rng.shuffle(group)
        count = round(len(group) * fraction) if len(group) > 1 else 0
        held_patients.update(group[:count])
    kept = [item for item in items if patient_of(item) not in held_patients]
    held = [item for item in items if patient_of(item) in held_patients]
    return kept, held


def write_split(dataset: Path, split: str, out: Path, holdout: float = 0.2, seed: int = 0) -> Path:
    data = json.loads((dataset / "datalist.json").read_text())
    training = absolute(data["training"], dataset)
    if split == "dev":
        training, validation = stratified_holdout(training, holdout, seed)
    else:
        validation = absolute(data["validation"], dataset)
    lists = {k: v for k, v in data.items() if k not in ("training", "validation")}
    path = out / f"{dataset.name}_{split}.json"
    path.write_text(json.dumps({**lists, "training": with_patients(training), "validation": with_patients(validation)},
                               indent=1))
    return path


def with_patients(items: list[dict]) -> list[dict]:
    """Each ChestX-ray14 image's patient as a `patient` key: `mmar validate`'s bootstrap interval then draws
    whole patients (mmar.engine.intervals). Other images are left as they are (one case, one unit)."""
    return [{**item, "patient": patient_of(item)} if NIH_NAME.match(Path(item["image"]).name) else item
            for item in items]


# ---- one run -------------------------------------------------------------------------------------


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_recipe(name: str, overrides: list[str], datalist: Path, root: Path, seed: int, epochs: int | None,
               log, threads: int = 2) -> dict:
    # torch's intra-op threads: 2 on an idle 2-core machine; 1 where other jobs share the cores, since two
    # OpenMP threads then wait for each other at every barrier whenever one of them is descheduled
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    subprocess.run([*MMAR, "init", str(root), "--task", "classification", "--datalist", str(datalist), "--force"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    sets = [*overrides, _set("determinism#random_seed", seed)]
    if epochs is not None:
        sets.append(_set("epochs", epochs))
    started = time.perf_counter()
    loads: dict[int, float] = {}
    process = subprocess.Popen([*MMAR, "train", str(root), "--restart", "--set", *sets], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in process.stdout:
        tail = (tail + [line])[-30:]
        match = EPOCH_LINE.match(line)
        if match:
            loads[int(match.group(1))] = loadavg()
            log(f"  {name} seed {seed}: {line.strip()} load {loads[int(match.group(1))]:.2f}")
    if process.wait() != 0:
        raise SystemExit(f"{name}: mmar train failed:\n{''.join(tail)}")
    train_seconds = time.perf_counter() - started
    import torch

    state = torch.load(root / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    progress = state.get("progress", state)
    history = progress["history"]
    for record in history:
        record["load1"] = loads.get(record["epoch"])
    result = {"recipe": name, "seed": seed, "datalist": str(datalist), "train_seconds": round(train_seconds, 1),
              "epochs": len(history), "history": history}
    for model, ckpt in (("best", "model.ckpt"), ("final", "model_final.ckpt")):
        done = subprocess.run([*MMAR, "validate", str(root), "--ckpt", str(root / "models" / ckpt), "--set", *sets],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: mmar validate failed:\n{done.stdout[-3000:]}")
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        result[model] = {"auc": metrics["val_mean_auc"], "accuracy": metrics["accuracy"],
                         "auc_per_label": metrics["auc_per_label"]}
    aucs = [r["val_mean_auc"] for r in history if "val_mean_auc" in r]
    late = aucs[-max(1, len(aucs) // 3):]
    result["late_swing"] = max(late) - min(late)
    result["best_epoch"] = progress.get("best_epoch")
    result["median_epoch_seconds"] = statistics.median(r["seconds"] for r in history)
    return result


def summarize(results: list[dict]) -> str:
    """One row per (data, recipe): medians over seeds and their spread (min-max)."""
    rows = ["| data | recipe | seeds | epochs | final AUC | final acc | best-model AUC | best-model acc | late swing "
            "| s/epoch (load) | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((Path(r["datalist"]).stem, r["recipe"]), []).append(r)

    def cell(values, digits=3):
        med = statistics.median(values)
        if len(values) == 1:
            return f"{med:.{digits}f}"
        return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    for (data, recipe), runs in groups.items():
        loads = [h["load1"] for r in runs for h in r["history"] if h.get("load1") is not None]
        rows.append(
            f"| {data} | {recipe} | {len(runs)} | {statistics.median(r['epochs'] for r in runs):.0f} "
            f"| {cell([r['final']['auc'] for r in runs])} "
            f"| {cell([r['final']['accuracy'] for r in runs])} | {cell([r['best']['auc'] for r in runs])} "
            f"| {cell([r['best']['accuracy'] for r in runs])} | {cell([r['late_swing'] for r in runs])} "
            f"| {statistics.median(r['median_epoch_seconds'] for r in runs):.1f} "
            f"({statistics.median(loads) if loads else float('nan'):.1f}) "
            f"| {statistics.median(r['train_seconds'] for r in runs):.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "runtime"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="breastmnist,nih", help="comma-separated: breastmnist, nih")
    parser.add_argument("--split", choices=("dev", "final"), default="final")
    parser.add_argument("--recipes", default="current,default", help="comma-separated names (see candidates())")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs (not for the table)")
    parser.add_argument("--quick", action="store_true", help="3 epochs, one seed: a smoke run")
    parser.add_argument("--default-only", action="store_true", help="only the default recipe, one seed (timing)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per run (OMP_NUM_THREADS): 2 on an idle 2-core CPU, 1 on a shared one")
    parser.add_argument("--out", default=None, help="keep MMARs and results.jsonl here (default: a temp folder)")
    parser.add_argument("--table", nargs="+", metavar="JSONL", help="only print the table of earlier results.jsonl files")
    args = parser.parse_args(argv)
    if args.table:
        records = [json.loads(line) for path in args.table for line in Path(path).read_text().splitlines() if line]
        print(summarize(records))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    recipes = candidates()
    names = args.recipes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    epochs = args.epochs
    if args.quick:
        epochs, seeds = 3, seeds[:1]
    if args.default_only:
        names, seeds = ["default"], seeds[:1]
    unknown = [n for n in names if n not in recipes]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; known: {sorted(recipes)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_cls_"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for data in args.data.split(","):
        datalist = write_split(DATASETS[data], args.split, out)
        for name in names:
            for seed in seeds:
                print(f"{data} {name} seed {seed} ({args.split}) ...", flush=True)
                result = run_recipe(name, recipes[name], datalist, out / f"{data}_{args.split}_{name}_s{seed}", seed,
                                    epochs, log=lambda line: print(line, flush=True), threads=args.threads)
                result["threads"] = args.threads
                result["data"] = data
                results.append(result)
                with open(out / "results.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(result) + "\n")
                print(f"{data} {name} seed {seed}: final AUC {result['final']['auc']:.3f} acc "
                      f"{result['final']['accuracy']:.3f}; best-model AUC {result['best']['auc']:.3f} (epoch "
                      f"{result['best_epoch']}); late swing {result['late_swing']:.3f}; {result['train_seconds']:.0f} s",
                      flush=True)
    print(summarize(results))
    print(f"records: {out / 'results.jsonl'}")
    return 0


if __name__ == "__main__":
    # this benchmark swaps whole components (`_target_`, `$` expressions) through --set, which mmar refuses
    # unless asked (docs/security.md): its subprocesses inherit the opt-in (set here, not at import: tests import it)
    os.environ.setdefault("MMAR_ALLOW_EXPRESSIONS", "1")
    raise SystemExit(main())
