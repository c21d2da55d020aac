#!/usr/bin/env python
"""Does a start from a model trained on the NIH chest X-ray sample help BreastMNIST? (issue 35, item 3)

Through the real CLI, the default recipe of `mmar init` on both: train the NIH sample (15 findings, 64 px) on
its `training` list, then BreastMNIST (1 label, 32 px) twice with the same recipe, seed and epochs: from
scratch (`mmar train`) and from the NIH model (`mmar train --finetune --ckpt NIH/models/model.ckpt`: every
tensor of the DenseNet121 body loaded, the 15-output layer re-initialised for the 1 label,
`mmar.engine.transfer`). Both BreastMNIST models are validated on its shared `validation` list, last epoch
(`model_final.ckpt`, no choice made on that list) and `model.ckpt`, with the bootstrap interval of each.

    python bench/transfer_classification.py --seeds 0 --threads 2 --out transfer/
    python bench/transfer_classification.py --nih-model RUN/nih/models/model.ckpt --seeds 0,1   # reuse an NIH model

Records: `results.jsonl` under `--out`, one line per BreastMNIST run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "runtime"))

import train_classification as bench  # noqa: E402

MMAR = [sys.executable, "-m", "mmar"]


def cli(*args: str, env: dict) -> str:
    done = subprocess.run([*MMAR, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mmar {' '.join(args)} failed:\n{done.stdout[-3000:]}")
    return done.stdout


def validate(root: Path, env: dict) -> dict:
    out = {}
    for name, ckpt in (("final", "model_final.ckpt"), ("best", "model.ckpt")):
        cli("validate", str(root), "--ckpt", str(root / "models" / ckpt), env=env)
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        interval = metrics.get("intervals", {}).get("val_mean_auc", {})
        out[name] = {"auc": metrics["val_mean_auc"], "accuracy": metrics["accuracy"],
                     "lower": interval.get("lower"), "upper": interval.get("upper"),
                     "epoch": (metrics.get("selection") or {}).get("epoch")}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nih-model", default=None, help="an NIH model.ckpt to start from (default: train one)")
    parser.add_argument("--out", default="transfer")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONUNBUFFERED": "1"}
    nih_model = Path(args.nih_model) if args.nih_model else None
    if nih_model is None:
        nih = out / "nih"
        cli("init", str(nih), "--task", "classification", "--force",
            "--datalist", str(bench.write_split(bench.DATASETS["nih"], "final", out)), env=env)
        started = time.perf_counter()
        cli("train", str(nih), "--restart", env=env)
        print(f"NIH model trained in {time.perf_counter() - started:.0f} s", flush=True)
        nih_model = nih / "models" / "model.ckpt"
    datalist = bench.write_split(bench.DATASETS["breastmnist"], "final", out)
    for seed in (int(s) for s in args.seeds.split(",")):
        for start in ("scratch", "nih"):
            root = out / f"breastmnist_{start}_s{seed}"
            cli("init", str(root), "--task", "classification", "--datalist", str(datalist), "--force", env=env)
            command = ["train", str(root), "--restart", "--set", f"determinism#random_seed={seed}"]
            if start == "nih":
                command += ["--finetune", "--ckpt", str(nih_model)]
            started = time.perf_counter()
            log = cli(*command, env=env)
            seconds = time.perf_counter() - started
            reinitialised = [line for line in log.splitlines() if "re-initialised" in line or "reinitialised" in line]
            result = {"start": start, "seed": seed, "train_seconds": round(seconds, 1), "nih_model": str(nih_model),
                      **validate(root, env), "transfer_log": reinitialised[:2]}
            with open(out / "results.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
