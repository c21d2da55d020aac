#!/usr/bin/env python
"""Classification recipes compared by k-fold cross-validation on the shared `training` list (issue 35).

Why another bench: a recipe change worth +0.01 AUC cannot be seen on one held-out fifth (82-109 images: the
standard error of one AUC is about 0.04), nor on the shared validation list (78 images). Here every image of
the training list is held out exactly once: k stratified folds (by patient, the label's groups, a fixed
draw), one training per (recipe, fold), the averaged weights of the last epoch (what `within_noise` kept in
every BreastMNIST run, docs/classification.md) predict the held-out fold in float32 (as deployed). The
out-of-fold predictions of all folds are pooled: one AUC and accuracy over the whole list (546 images for
BreastMNIST), a 95 % bootstrap interval of each, and, against the baseline recipe, the *paired* bootstrap
interval of the difference (the same images resampled for both recipes), which is what tells a recipe
change from the luck of the split. The shared `validation` list is never read.

The training is `bench/model_selection.py`'s loop (the engine's own `WeightAverage`, AdamW + cosine per
epoch over a step budget, mixup, bf16 autocast on a CPU with bf16, no batch under half a batch) with the
recipe keys of `bench/screen_classification.py` (net, steps, bs, lr, wd, ema, mixup, rot, scale, flip,
smooth) and `size` (the pixel grid the images are resized to: `spatial_size`). Every run also records the
fold's predictions averaged over the image and its left-right mirror (`tta_flip`), which costs one more
forward pass.

    python bench/recipe_cv.py run --recipes default,smooth --folds 0,2,4 --out cv_a.jsonl &   # two processes,
    python bench/recipe_cv.py run --recipes default,smooth --folds 1,3 --out cv_b.jsonl       # one thread each
    python bench/recipe_cv.py table cv_a.jsonl cv_b.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "runtime"))

import screen_classification as screen  # noqa: E402
import train_classification as bench  # noqa: E402

DEFAULT = {"net": "densenet121", "mixup": 1.0, "ema": 0.99, "steps": 600, "bs": 32, "lr": 1e-3, "wd": 1e-4,
           "size": None}  # None: what `mmar init` picks for the data (BreastMNIST 32 px, the NIH sample 64)
INIT_SIZE = {"breastmnist": 32, "nih": 64}
RECIPES = {
    "default": DEFAULT,                                  # what `mmar init` writes
    "steps1200": {**DEFAULT, "steps": 1200},             # twice the budget
    "smooth": {**DEFAULT, "smooth": 0.1},                # label smoothing 0.1
    "flip": {**DEFAULT, "flip": True},                   # left-right flips in training
    "size64": {**DEFAULT, "size": 64},                   # 28 px upsampled to 64 (2x2 maps at the last block)
    "wd05": {**DEFAULT, "wd": 0.05},                     # stronger weight decay
    "lr3e-4": {**DEFAULT, "lr": 3e-4},
    "noaffine": {**DEFAULT, "rot": 0.0, "scale": 0.0},
}


def folds(items: list[dict], k: int, seed: int) -> list[list[dict]]:
    """k disjoint folds covering `items`: the patients of each group of identical label lists dealt out in
    turn after one shuffle, so each fold holds the label mix of the list; a patient's images stay together."""
    groups = bench.label_groups(items)
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    turn = 0
    for key in sorted(groups):
        group = sorted(groups[key])
        rng.shuffle(group)
        for patient in group:
            fold_of[patient] = turn % k
            turn += 1
    return [[item for item in items if fold_of[bench.patient_of(item)] == f] for f in range(k)]


def fold_split(name: str, k: int, fold: int, seed: int):
    folder = bench.DATASETS[name]
    training = bench.absolute(json.loads((folder / "datalist.json").read_text())["training"], folder)
    parts = folds(training, k, seed)
    held = parts[fold]
    kept = [item for i, part in enumerate(parts) if i != fold for item in part]
    return kept, held


def predict(model, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():  # float32, as the exported model runs
        return torch.sigmoid(model(images).float())


def train(recipe: dict, train_x: torch.Tensor, train_y: torch.Tensor, seed: int,
          on_epoch=None) -> tuple[torch.nn.Module, dict]:
    """The default recipe's loop (module docstring) with `recipe`'s values; `on_epoch(epoch, averaged network,
    mean loss, seconds)` after every epoch (bench/model_selection.py records its predictions there).
    Returns the averaged network of the last epoch and a summary."""
    from mmar.engine.precision import cpu_bf16_supported
    from mmar.engine.weight_average import WeightAverage

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    mix_draws = np.random.default_rng(seed)
    model = screen.network(recipe["net"], train_y.shape[1], train_x.shape[-1])
    average = WeightAverage(model, recipe["ema"])
    batch = recipe["bs"]
    steps_per_epoch = len(train_x) // batch + (1 if len(train_x) % batch >= batch // 2 else 0)
    epochs = max(1, round(recipe["steps"] / math.ceil(len(train_x) / batch)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["wd"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)  # per epoch, as init writes
    bf16 = cpu_bf16_supported()
    losses, started = [], time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        epoch_started = time.time()
        order = torch.randperm(len(train_x), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch:(step + 1) * batch]
            losses.append(screen.batch_step(model, optimizer, train_x[index], train_y[index], recipe, generator,
                                            mix_draws, bf16))
            average.update()
        schedule.step()
        if on_epoch is not None:
            on_epoch(epoch, average.module, float(np.mean(losses[-steps_per_epoch:])), time.time() - epoch_started)
    return average.module, {"epochs": epochs, "train_s": round(time.time() - started, 1),
                            "last_loss": round(float(np.mean(losses[-steps_per_epoch:])), 4)}


def run_one(name: str, recipe_name: str, k: int, fold: int, seed: int) -> dict:
    recipe = RECIPES[recipe_name]
    kept, held = fold_split(name, k, fold, seed)
    size = recipe["size"] or INIT_SIZE[name]
    train_x, train_y = screen.load_images(kept, size)
    held_x, held_y = screen.load_images(held, size)
    model, info = train(recipe, train_x, train_y, seed * 100 + fold)
    plain = predict(model, held_x)
    mirrored = (plain + predict(model, held_x.flip(-1))) / 2
    return {"data": name, "recipe_name": recipe_name, "recipe": recipe, "k": k, "fold": fold, "seed": seed, **info,
            "images": [Path(item["image"]).name for item in held], "labels": held_y.tolist(),
            "probs": [[round(float(p), 5) for p in row] for row in plain],
            "probs_tta_flip": [[round(float(p), 5) for p in row] for row in mirrored], "loadavg": bench.loadavg()}


# ---- offline: pooled out-of-fold figures ------------------------------------------------------------


def mean_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    from mmar.classification_metrics import _auc as auc

    values = [auc(torch.from_numpy(probs[:, j]), torch.from_numpy(labels[:, j]).long())
              for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]
    return float(np.mean(values))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(((probs >= 0.5) == (labels >= 0.5)).mean())


def pooled(runs: list[dict], key: str) -> dict[str, tuple[np.ndarray, np.ndarray, list]]:
    """recipe -> the out-of-fold probabilities and labels of every (fold draw, image), in one order, and those
    (seed, image) names. With several fold draws (`--seed`) each image is there once per draw."""
    by_recipe: dict[str, dict[tuple, tuple]] = {}
    for run in runs:
        for image, label, prob in zip(run["images"], run["labels"], run[key]):
            by_recipe.setdefault(run["recipe_name"], {})[(run["seed"], image)] = (prob, label)
    out = {}
    for recipe, table_ in by_recipe.items():
        names = sorted(table_)
        out[recipe] = (np.array([table_[n][0] for n in names]), np.array([table_[n][1] for n in names]), names)
    return out


def bootstrap(fn, arrays: list[tuple[np.ndarray, np.ndarray]], names: list[tuple], resamples: int = 2000,
              seed: int = 0):
    """95 % percentile interval of `fn` over resamples of whole images (`mmar.engine.intervals`, as `mmar
    validate`'s): an image drawn brings its rows of every fold draw (`names`: the rows' (seed, image)), since
    two draws' predictions of one image are not independent."""
    from mmar.engine.intervals import percentile, resample_rows

    values = [fn(*[(p[index], y[index]) for p, y in arrays])
              for index in resample_rows([image for _, image in names], resamples, seed)]
    return percentile(np.asarray(values, dtype=float), 0.95)


def table(runs: list[dict], baseline: str = "default") -> str:
    k = runs[0]["k"]
    draws = sorted({r["seed"] for r in runs})
    lines = [f"{runs[0]['data']}, {k}-fold cross-validation of the shared training list (fold draws {draws}), "
             "last epoch's averaged weights, float32; pooled out-of-fold figures, 95 % bootstrap intervals "
             "(2000 resamples of images; the difference paired on the same images)", "",
             "| recipe | runs | predictions | AUC (95 % interval) | acc (95 % interval) | AUC - baseline (95 % interval) "
             "| acc - baseline | per-fold AUC - baseline | AUC, flip TTA | train s/run (median) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    plain, flipped = pooled(runs, "probs"), pooled(runs, "probs_tta_flip")
    base = plain.get(baseline)
    fold_auc = {(r["recipe_name"], r["seed"], r["fold"]): mean_auc(np.array(r["probs"]), np.array(r["labels"]))
                for r in runs}
    for recipe in sorted(plain, key=lambda r: (r != baseline, r)):
        probs, labels, names = plain[recipe]
        recipe_runs = [r for r in runs if r["recipe_name"] == recipe]
        auc, acc = mean_auc(probs, labels), accuracy(probs, labels)
        auc_ci = bootstrap(lambda a: mean_auc(*a), [(probs, labels)], names)
        acc_ci = bootstrap(lambda a: accuracy(*a), [(probs, labels)], names)
        diff, diff_acc, per_fold = "", "", ""
        common = sorted(set(names) & set(base[2])) if base is not None and recipe != baseline else []
        if common:  # paired on the images both recipes held out (the folds both ran)
            mine, theirs = ([row[2].index(n) for n in common] for row in (plain[recipe], base))
            a, b = (probs[mine], labels[mine]), (base[0][theirs], base[1][theirs])
            d = mean_auc(*a) - mean_auc(*b)
            lo, hi = bootstrap(lambda x, y: mean_auc(*x) - mean_auc(*y), [a, b], common)
            diff = f"{d:+.4f} ({lo:+.4f} to {hi:+.4f})" + ("" if len(common) == len(names) else f" on {len(common)}")
            diff_acc = f"{accuracy(*a) - accuracy(*b):+.4f}"
            per_fold = ", ".join(f"{fold_auc[(recipe, d, f)] - fold_auc[(baseline, d, f)]:+.3f}" for d in draws
                                 for f in range(k) if (recipe, d, f) in fold_auc and (baseline, d, f) in fold_auc)
        lines.append(f"| `{recipe}` | {len(recipe_runs)} | {len(labels)} | {auc:.4f} ({auc_ci[0]:.3f}-{auc_ci[1]:.3f}) "
                     f"| {acc:.4f} ({acc_ci[0]:.3f}-{acc_ci[1]:.3f}) | {diff} | {diff_acc} | {per_fold} "
                     f"| {mean_auc(flipped[recipe][0], flipped[recipe][1]):.4f} "
                     f"| {statistics.median(r['train_s'] for r in recipe_runs):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train (recipe, fold) pairs, one JSON line each, appended to --out")
    run.add_argument("--data", default="breastmnist", choices=sorted(bench.DATASETS))
    run.add_argument("--recipes", default="default", help=f"comma-separated, of: {', '.join(RECIPES)}")
    run.add_argument("--k", type=int, default=5)
    run.add_argument("--folds", default="0,1,2,3,4")
    run.add_argument("--seed", type=int, default=0, help="the folds' draw (and, with the fold, the training's)")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--out", required=True)
    show = sub.add_parser("table", help="the pooled comparison from recorded runs")
    show.add_argument("records", nargs="+")
    show.add_argument("--baseline", default="default")
    args = parser.parse_args(argv)
    if args.command == "table":
        runs = [json.loads(line) for path in args.records for line in Path(path).read_text().splitlines() if line]
        print(table(runs, args.baseline))
        return 0
    torch.set_num_threads(args.threads)
    for fold in [int(f) for f in args.folds.split(",")]:
        for recipe in args.recipes.split(","):
            record = run_one(args.data, recipe, args.k, fold, args.seed)
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            probs, labels = np.array(record["probs"]), np.array(record["labels"])
            print(f"RESULT {recipe} fold {fold}: AUC {mean_auc(probs, labels):.4f} acc {accuracy(probs, labels):.4f} "
                  f"{record['train_s']:.0f} s ({record['epochs']} epochs, load {record['loadavg']:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
