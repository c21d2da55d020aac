"""Segmentation recipe variants side by side (issue 9's ablation), then `mmar validate` of each best model
with one pass and with test-time mirroring.

Each variant is `bench/train.py --recipes mmar` with `--set` overrides of `mmar init`'s defaults, all
started at once (on a GPU they share it; on a 2-core CPU run one at a time with --only). The overrides
spell out every ingredient, so the table stays reproducible when the defaults change:

    python bench/recipe_variants.py --out /tmp/variants --budget-min 6.2 --device cuda    # all, one GPU
    python bench/recipe_variants.py --only wide40 --device cpu --budget-min 30            # one, on a CPU

Prints per variant: epochs run, best per-epoch validation Dice (per class) and epoch, and the Dice of
`mmar validate` of the best model, plain and mirrored. Per-epoch records: OUT/NAME/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from mmar.tasks.segmentation import augmentation  # noqa: E402  (the current default's random steps)

NARROW = [16, 32, 64, 128]  # the default before issue 9's second round
WIDE = [32, 64, 128, 256]  # nnU-Net's widths: the default now
PLAIN_LOSS = {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True}
BATCH_DICE = {**PLAIN_LOSS, "include_background": False, "batch": True}
WITH_AFFINE = augmentation()
WITHOUT_AFFINE = [step for step in WITH_AFFINE if step["_target_"] != "RandAffined"]
MORE_INTENSITY = WITH_AFFINE + [
    {"_target_": "RandGaussianNoised", "keys": "@image_key", "prob": 0.1, "std": 0.1},
    {"_target_": "RandGaussianSmoothd", "keys": "@image_key", "prob": 0.2,
     "sigma_x": [0.5, 1.0], "sigma_y": [0.5, 1.0], "sigma_z": [0.5, 1.0]},
    {"_target_": "RandAdjustContrastd", "keys": "@image_key", "prob": 0.3, "gamma": [0.7, 1.5]},
]


def _set(key, value) -> str:
    return f"{key}={json.dumps(value)}"


def recipe(epochs, channels, loss, aug, seed=42) -> list[str]:
    return [_set("epochs", epochs), _set("network#channels", channels), _set("train#loss", loss),
            _set("train#augmentation", aug), _set("determinism#random_seed", seed)]


VARIANTS = {
    "ctl60": recipe(60, NARROW, PLAIN_LOSS, WITHOUT_AFFINE),  # the previous default, trained longer
    "loss60": recipe(60, NARROW, BATCH_DICE, WITHOUT_AFFINE),
    "aff60": recipe(60, NARROW, BATCH_DICE, WITH_AFFINE),
    "aug60": recipe(60, NARROW, BATCH_DICE, MORE_INTENSITY),
    "wide40": recipe(40, WIDE, BATCH_DICE, WITH_AFFINE),  # = the default now (which runs 42 epochs)
    "aff60s7": recipe(60, NARROW, BATCH_DICE, WITH_AFFINE, seed=7),
    "mid48": recipe(48, [24, 48, 96, 192], BATCH_DICE, WITH_AFFINE),
}


def run_variant(name: str, sets: list[str], args, lines: dict) -> None:
    work = Path(args.out) / name
    command = [sys.executable, str(ROOT / "bench" / "train.py"), "--recipes", "mmar", "--device", args.device,
               "--budget-min", str(args.budget_min), "--data", args.data, "--out", str(work),
               "--no-final-validation", *sum((["--mmar-set", s] for s in sets), [])]
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "stdout.txt", "w", encoding="utf-8") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    records = json.loads((work / "results.json").read_text())["epochs"]["mmar"] if (work / "results.json").exists() else []
    scored = [r for r in records if r.get("mean_dice") is not None]
    best = max(scored, key=lambda r: r["mean_dice"], default=None)
    line = f"{name:8s} {len(records):3d} epochs  "
    line += (f"best {best['mean_dice']:.4f} ({' / '.join(f'{d:.4f}' for d in best['dice_per_class'])}) at epoch "
             f"{best['epoch']}" if best else "no validation")
    # `mmar validate` reads config_validation.json, which does not carry the training-time --set overrides:
    # the network's shape must be given again
    network = [s for s in sets if s.startswith("network#")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "runtime")}
    for label, extra in (("one pass", ["validate#inferer#mirror_axes=[]"]), ("mirrored", [])):
        done = subprocess.run([sys.executable, "-m", "mmar", "validate", str(work / "mmar"), "--set", *network, *extra],
                              capture_output=True, text=True, env=env, check=False)
        metrics = work / "mmar" / "eval" / "metrics.json"
        value = json.loads(metrics.read_text())["val_mean_dice"] if done.returncode == 0 else None
        line += f"  | validate {label}: " + (f"{value:.4f}" if value is not None else "failed")
    lines[name] = line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    parser.add_argument("--out", default="/tmp/mmar-recipe-variants")
    parser.add_argument("--budget-min", type=float, default=6.2, help="training budget of each variant")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    chosen = [n for n in (args.only.split(",") if args.only else VARIANTS) if n]
    unknown = [n for n in chosen if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    lines: dict[str, str] = {}
    threads = [threading.Thread(target=run_variant, args=(n, VARIANTS[n], args, lines)) for n in chosen]
    for thread in threads:
        thread.start()
        time.sleep(2)  # staggered start-up: the caches are built one after the other
    for thread in threads:
        thread.join()
    for name in chosen:
        print(lines.get(name, f"{name}: no result"))
    return 0


if __name__ == "__main__":
    # this benchmark swaps whole components (`_target_`, `$` expressions) through --set, which mmar refuses
    # unless asked (docs/security.md): its subprocesses inherit the opt-in (set here, not at import: tests import it)
    os.environ.setdefault("MMAR_ALLOW_EXPRESSIONS", "1")
    sys.exit(main())
