#!/usr/bin/env python
"""Which epoch should `model.ckpt` hold? Model-selection rules compared over seeds on a dev split (issue 35).

One training per seed records, every epoch, the averaged weights' predictions on two disjoint fifths of the
shared `training` list that it does not train on: `dev-val` (the list the rule looks at, as `mmar train`'s
validation list) and `dev-test` (never looked at by any rule: what the picked epoch is worth). Every rule is
then replayed offline on the same runs (`RULES`, the engine's own code in `mmar.engine.selection`), so the
rules differ only in the pick, not in the luck of the training. The shared `validation` list is not read.

The training is `bench/recipe_cv.py`'s one-process loop (`train`, shared) (the default recipe: DenseNet121,
mixup alpha 1, AdamW 1e-3 + cosine over 600 steps of 32, bf16 autocast on a CPU with bf16, no batch under
half a batch), with the engine's own weight average (`mmar.engine.weight_average.WeightAverage`, warm-up and
batch-norm statistics included). Every epoch dev-val and dev-test are predicted in bf16 autocast (as `mmar
train` validates) and in float32 (as the exported model runs): the precision figure of issue 35, item 4.

    python bench/model_selection.py run --data breastmnist --seeds 0,1,2,3,4 --out selection.jsonl
    python bench/model_selection.py table selection.jsonl       # the rules side by side (docs/classification.md)

Segmentation: bench/model_selection_segmentation.py records runs of the real `mmar train` (hippocampus); this
`table` prints theirs too (docs/model-selection.md, "Segmentation").

Split per seed (`--holdout 0.3`): 30 % of the patients of each label group are held out (stratified,
`train_classification.stratified_holdout`, the seed's own draw), then halved into dev-val and dev-test the
same way: BreastMNIST 382 / 82 / 82 images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "runtime"))

import recipe_cv  # noqa: E402
import screen_classification as screen  # noqa: E402
import train_classification as bench  # noqa: E402

RECIPE = recipe_cv.DEFAULT  # the training loop is recipe_cv.train's


def split(name: str, seed: int, holdout: float):
    folder = bench.DATASETS[name]
    datalist = json.loads((folder / "datalist.json").read_text())
    training = bench.absolute(datalist["training"], folder)
    kept, held = bench.stratified_holdout(training, holdout, seed)
    test, val = bench.stratified_holdout(held, 0.5, seed + 1000)
    size = 32 if name == "breastmnist" else 64
    return screen.load_images(kept, size), screen.load_images(val, size), screen.load_images(test, size)


def predict(model, images: torch.Tensor, bf16: bool) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return torch.sigmoid(model(images).float())


def train_run(name: str, seed: int, holdout: float, recipe: dict) -> dict:
    from mmar.engine.precision import cpu_bf16_supported

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = split(name, seed, holdout)
    bf16 = cpu_bf16_supported()
    history = []

    def record(epoch, network, loss, seconds):
        entry = {"epoch": epoch, "loss": loss, "s": round(seconds, 1)}
        for where, images in (("val", val_x), ("test", test_x)):
            for precision, flag in (("bf16", bf16), ("fp32", False)):
                entry[f"{where}_{precision}"] = [round(float(p), 5) for p in predict(network, images, flag)[:, 0]]
        history.append(entry)
        aucs = {k: _auc(entry[k], (val_y if k.startswith("val") else test_y)[:, 0].tolist())
                for k in ("val_bf16", "test_fp32")}
        print(json.dumps({"seed": seed, "epoch": epoch, "loss": round(loss, 4), **{k: round(v, 4) for k, v in aucs.items()},
                          "s": entry["s"]}), flush=True)

    _, info = recipe_cv.train(recipe, train_x, train_y, seed, on_epoch=record)
    return {"data": name, "seed": seed, "holdout": holdout, "recipe": recipe, "bf16": bf16, "epochs": info["epochs"],
            "val_labels": val_y[:, 0].tolist(), "test_labels": test_y[:, 0].tolist(), "train_cases": len(train_x),
            "train_s": info["train_s"], "history": history}


# ---- offline: the rules on recorded runs -----------------------------------------------------------


def _auc(probs, labels) -> float:
    from mmar.classification_metrics import _auc as auc

    return auc(torch.tensor(probs), torch.tensor(labels).long())


def _accuracy(probs, labels) -> float:
    return float(np.mean([(p >= 0.5) == (y >= 0.5) for p, y in zip(probs, labels)]))


def rules() -> dict:
    from mmar.engine import selection

    return {name: selection.RULES[name] for name in selection.RULES}


def replay(run: dict, precision: str = "bf16") -> dict:
    """Each rule's pick on one run: the epoch and its dev-test AUC / accuracy (float32, as deployed)."""
    from mmar.engine.selection import replay as replay_rule

    val = [_auc(h[f"val_{precision}"], run["val_labels"]) for h in run["history"]]
    noise = [_noise(h[f"val_{precision}"], run["val_labels"]) for h in run["history"]]
    out = {}
    for name in rules():
        epoch = replay_rule(name, val, noise)
        record = run["history"][epoch - 1]
        out[name] = {"epoch": epoch, "test_auc": _auc(record["test_fp32"], run["test_labels"]),
                     "test_acc": _accuracy(record["test_fp32"], run["test_labels"]), "val_auc": val[epoch - 1]}
    return out


def _noise(probs, labels) -> float:
    from mmar.engine.selection import auc_standard_error

    return auc_standard_error(torch.tensor(probs), torch.tensor(labels))


def rule_rows(picks: list[dict], score: str, label: str, extra: tuple[str, str] | None = None) -> list[str]:
    """The rules side by side over seeds, one markdown row each: the epochs picked, the held-out `score` of the
    pick (`label` in the header: median and range, mean), paired with `best`'s and with the last epoch's pick
    of the same run (median, worst), and `extra` (key, header) as a median column. `picks`: one {rule:
    {"epoch", score, ...}} per run. Shared with bench/model_selection_segmentation.py."""
    header = (f"| rule | epochs picked | {label} median (range) | mean | vs `best`, paired (median, worst) "
              "| vs last epoch, paired (median, worst) |" + (f" {extra[1]} median |" if extra else ""))
    lines = [header, "|---|---|---|---|---|---|" + ("---|" if extra else "")]
    best = [p["best"][score] for p in picks]
    final = [p["last"][score] for p in picks]
    for name in rules():
        values = [p[name][score] for p in picks]
        diffs = [a - f for a, f in zip(values, final)]
        gains = [a - b for a, b in zip(values, best)]
        row = (f"| `{name}` | {', '.join(str(p[name]['epoch']) for p in picks)} | {statistics.median(values):.3f} "
               f"({min(values):.3f}-{max(values):.3f}) | {statistics.mean(values):.3f} "
               f"| {statistics.median(gains):+.3f}, {min(gains):+.3f} "
               f"| {statistics.median(diffs):+.3f}, {min(diffs):+.3f} |")
        if extra:
            row += f" {statistics.median(p[name][extra[0]] for p in picks):.3f} |"
        lines.append(row)
    return lines


def table(runs: list[dict]) -> str:
    picks = [replay(run) for run in runs]
    oracle = [max(_auc(h["test_fp32"], run["test_labels"]) for h in run["history"]) for run in runs]
    lines = [f"{len(runs)} seeds ({', '.join(str(r['seed']) for r in runs)}), {runs[0]['data']}, "
             f"{len(runs[0]['val_labels'])} dev-val / {len(runs[0]['test_labels'])} dev-test images, "
             f"{runs[0]['epochs']} epochs; oracle (best dev-test epoch) median {statistics.median(oracle):.3f}", ""]
    return "\n".join(lines + rule_rows(picks, "test_auc", "dev-test AUC", extra=("test_acc", "dev-test acc")))


def precision_table(runs: list[dict]) -> str:
    """bf16 against float32 per-epoch AUC on dev-val: the gap beside the metric's own noise."""
    gaps, noise, flips = [], [], 0
    for run in runs:
        for h in run["history"]:
            a, b = _auc(h["val_bf16"], run["val_labels"]), _auc(h["val_fp32"], run["val_labels"])
            gaps.append(abs(a - b))
            noise.append(_noise(h["val_fp32"], run["val_labels"]))
        picks = {p: replay(run, p)["best"]["epoch"] for p in ("bf16", "fp32")}
        flips += picks["bf16"] != picks["fp32"]
    return (f"bf16 vs float32 dev-val AUC over {len(gaps)} epochs of {len(runs)} runs: |difference| median "
            f"{statistics.median(gaps):.4f}, max {max(gaps):.4f}; the AUC's standard error median "
            f"{statistics.median(noise):.3f}; the best-on-validation epoch differs in {flips} of {len(runs)} runs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--data", default="breastmnist", choices=sorted(bench.DATASETS))
    run.add_argument("--seeds", default="0,1,2,3,4")
    run.add_argument("--holdout", type=float, default=0.3)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--out", default="selection.jsonl")
    show = sub.add_parser("table")
    show.add_argument("records", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "run":
        torch.set_num_threads(args.threads)
        for seed in (int(s) for s in args.seeds.split(",")):
            result = train_run(args.data, seed, args.holdout, RECIPE)
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(result) + "\n")
        return 0
    runs = [json.loads(line) for path in args.records for line in Path(path).read_text().splitlines() if line]
    for data in sorted({r["data"] for r in runs}):
        chosen = [r for r in runs if r["data"] == data]
        if chosen[0].get("task") == "segmentation":  # bench/model_selection_segmentation.py's records
            import model_selection_segmentation as segmentation

            print(segmentation.table(chosen))
            continue
        print(table(chosen))
        print()
        print(precision_table(chosen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
