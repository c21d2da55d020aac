#!/usr/bin/env python
"""Which weights to validate: the trained ones or a moving average of them (train#ema), paired in one run.

    python bench/weight_average.py                                  # hippocampus, 10 epochs, CPU or GPU
    python bench/weight_average.py --decays 0.97,0.98,0.995 --epochs 12
    python bench/weight_average.py --mmar-set determinism#random_seed=7   # another seed: another trajectory

Runs the real `mmar train` on `mmar init`'s default segmentation MMAR for DATA. An average takes no random
numbers and does not touch the training, so one run trains exactly one trajectory and, after every epoch,
validates on the same cases: the trained weights ("trained"), the engine's own average (the default decay,
"default"), and an average per extra decay (each a `WeightAverage` beside the engine's, updated after every
step). Prints one line per epoch with each variant's validation mean Dice, then the first epoch at which
each reaches 0.80 / 0.85 / 0.88 and its best. The run stops after --epochs (the schedule is the default
run's, so the epochs are those of the real run). Extra variants cost one validation pass each per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hippocampus"
THRESHOLDS = (0.80, 0.85, 0.88)
MARK = "WEIGHTS "


def _worker(args) -> int:
    """Inside the `mmar train` process: hook the engine's per-epoch validation."""
    import torch
    from ignite.engine import Events

    from mmar.engine import handlers, train
    from mmar.engine.checkpoint import unwrap
    from mmar.engine.weight_average import WeightAverage

    decays = [float(d) for d in args.decays.split(",") if d.strip()]
    hooks: dict = {}
    built = train.WeightAverage

    def engine_average(network, decay):  # the engine's own average; the trained network is its source
        hooks["trained"] = unwrap(network)
        hooks["default"] = built(network, decay)
        hooks["extra"] = {f"ema {d}": WeightAverage(network, d) for d in decays}
        return hooks["default"]

    train.WeightAverage = engine_average
    validate = handlers.EpochValidation.__call__

    def attach(self, trainer):
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)
        for average in hooks.get("extra", {}).values():
            average.attach(trainer)

    def paired(self, trainer):
        if "default" not in hooks:
            raise SystemExit("the MMAR has no train#ema: nothing to compare (mmar init writes one)")
        evaluated = unwrap(self.evaluator.network)  # the engine's average module
        kept = {k: v.clone() for k, v in evaluated.state_dict().items()}
        record = {"epoch": trainer.state.epoch}
        variants = {"trained": hooks["trained"], **{k: v.module for k, v in hooks["extra"].items()}}
        with torch.no_grad():
            for name, module in variants.items():
                evaluated.load_state_dict(module.state_dict())
                self.evaluator.run(global_epoch=trainer.state.epoch)
                record[name] = float(self.evaluator.state.metrics["val_mean_dice"])
            evaluated.load_state_dict(kept)
        validate(self, trainer)  # last: the engine's best-model bookkeeping reads these metrics
        record["default"] = float(self.evaluator.state.metrics["val_mean_dice"])
        print(MARK + json.dumps(record), flush=True)
        if trainer.state.epoch >= args.epochs:
            trainer.terminate()

    handlers.EpochValidation.attach = attach
    handlers.EpochValidation.__call__ = paired
    from mmar.cli import main

    return main(["train", args.mmar, *(["--set", *args.mmar_set] if args.mmar_set else [])])


def summarize(records: list[dict]) -> str:
    names = [k for k in records[0] if k != "epoch"]
    lines = ["epoch  " + "  ".join(f"{n:>12s}" for n in names)]
    lines += [f"{r['epoch']:5d}  " + "  ".join(f"{r[n]:12.4f}" for n in names) for r in records]
    lines.append("first epoch at or above, and the best [epoch]:")
    for name in names:
        firsts = []
        for threshold in THRESHOLDS:
            epoch = next((r["epoch"] for r in records if r[name] >= threshold), None)
            firsts.append(f"{threshold:.2f}: {epoch if epoch else '-':>2}")
        best = max(records, key=lambda r: r[name])
        lines.append(f"  {name:>12s}  " + "  ".join(firsts) + f"  best {best[name]:.4f} [{best['epoch']}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with datalist.json")
    parser.add_argument("--decays", default="0.97,0.995", help="extra decays to validate beside the default's")
    parser.add_argument("--epochs", type=int, default=10, help="stop after this many epochs")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu"],
                        help="cpu hides the GPUs (mmar train uses one when there is one)")
    parser.add_argument("--out", help="work folder (default: a temp folder)")
    parser.add_argument("--mmar-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `--set` override for mmar train (e.g. another seed)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mmar", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-weights-"))
    mmar = out / "mmar"
    subprocess.run([sys.executable, "-m", "mmar", "init", str(mmar), "--task", "segmentation", "--datalist",
                    str(Path(args.data) / "datalist.json"), "--force"], check=True, cwd=ROOT)
    for stale in ("train_state.pt", "model.ckpt"):
        (mmar / "models" / stale).unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mmar", str(mmar),
               "--decays", args.decays, "--epochs", str(args.epochs),
               *sum((["--mmar-set", kv] for kv in args.mmar_set), [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    records = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env=env) as process:
        for line in process.stdout:
            if line.startswith(MARK):
                records.append(json.loads(line[len(MARK):]))
                print("  " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in records[-1].items()), flush=True)
            elif "error" in line.lower():
                print(line.rstrip(), flush=True)
    if process.returncode != 0 or not records:
        print(f"mmar train failed (exit {process.returncode})", file=sys.stderr)
        return 1
    (out / "weights.json").write_text(json.dumps(records, indent=1))
    print(summarize(records))
    print(f"records: {out / 'weights.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
