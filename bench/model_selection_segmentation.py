#!/usr/bin/env python
"""Which epoch should `model.ckpt` hold, for segmentation? The model-selection rules over seeds (issue 35).

The segmentation half of bench/model_selection.py (same rules, same replay, same table): per seed, the
shared `training` list is split by case into train (70 %) and dev (30 %); the real `mmar train` trains
`mmar init`'s default segmentation MMAR on train and validates on dev every epoch (its `validation` list:
what the rules look at); every epoch the same weights (the engine's averaged model, validated as `mmar
train` validates: bf16 autocast on a CPU with bf16) are also scored on the shared `validation` list, the
held-out test no rule sees. Both are kept per case (MeanDice's details, cases x foreground classes), so
every rule of `mmar.engine.selection` is replayed offline on the dev curve with the engine's own noise
(`handlers.metric_noise`: the standard error of the mean Dice over cases) and its pick scored on test.

    python bench/model_selection_segmentation.py run --seeds 0,1,2 --epochs 20 --out seg.jsonl
    python bench/model_selection.py table seg.jsonl        # or this file's `table`: the same output

`run` options: `--data` (a folder with datalist.json; default the shared hippocampus), `--epochs` (the run's
length: the cosine schedule anneals within it; default `mmar init`'s for the train split), `--holdout` (the
dev fraction, 0.3), `--set KEY=VALUE` (more `mmar train --set` overrides, same for every seed), `--threads`.
Each seed's seed is both the split's and `determinism#random_seed`; `train#num_workers` is 0 so that one run
uses `--threads` cores. The engine's own pick (`train_state.pt`) is recorded beside the replay of its rule,
which must agree.

Table (`table`): per rule the epochs picked, the test mean Dice of the pick (median, range, mean), paired
against `best` (Clara's argmax on dev) and the last epoch (`model_final.ckpt`); then per seed the picks and
the noise of the dev figure: its standard error and its 95 % bootstrap interval width (mmar.engine.intervals,
cases resampled, as `mmar validate` writes it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "runtime"))

import model_selection as shared  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hippocampus"
MARK = "SELECTION "
KEY = "val_mean_dice"


def split(items: list[dict], seed: int, holdout: float) -> tuple[list[dict], list[dict]]:
    """(train, dev): `holdout` of the cases, drawn by the seed, in datalist order."""
    order = np.random.default_rng(seed).permutation(len(items))
    dev = set(int(i) for i in order[: max(1, round(len(items) * holdout))])
    return [x for i, x in enumerate(items) if i not in dev], [x for i, x in enumerate(items) if i in dev]


def _absolute(items: list[dict], folder: Path) -> list[dict]:
    return [{k: str(folder / v) if isinstance(v, str) and not os.path.isabs(v) else v for k, v in item.items()}
            for item in items]


def _details(evaluator) -> list[list[float | None]]:
    """MeanDice's per-case, per-class Dice of the evaluator's last run (None where undefined)."""
    details = evaluator.state.metric_details[KEY]
    array = np.asarray(details.detach().float().cpu() if hasattr(details, "detach") else details, dtype=float)
    array = array.reshape(array.shape[0], -1)
    return [[round(float(v), 5) if math.isfinite(v) else None for v in row] for row in array]


class _FreshMetrics:
    """The parser, except that `validate#metrics` are new handler objects: the parser's own are attached to the
    engine's evaluator (a handler attached to two engines writes its details into the last one's state)."""

    def __init__(self, parser):
        self._parser = parser

    def __getattr__(self, name):
        return getattr(self._parser, name)

    def get_parsed_content(self, name, **kwargs):
        if name != "validate#metrics":
            return self._parser.get_parsed_content(name, **kwargs)
        import copy

        from monai.bundle import ConfigParser

        return ConfigParser(copy.deepcopy(self._parser.config)).get_parsed_content(name)


# ---- inside the `mmar train` process ----------------------------------------------------------------


def _worker(args) -> int:
    """The real `mmar train`, with a second evaluator over the test list beside the engine's (dev) one."""
    import torch

    torch.set_num_threads(args.threads)
    from mmar.engine import handlers, train

    for name in ("validation_loader", "build_evaluator"):
        if not hasattr(train, name):
            raise SystemExit(f"mmar.engine.train has no {name} any more: bench/model_selection_segmentation.py "
                             "hooks it to score the test list; update the hook")
    test_items = json.loads(Path(args.test).read_text())
    hooks: dict = {}
    make_loader, make_evaluator = train.validation_loader, train.build_evaluator

    def loader(parser, items, **kwargs):  # the test list read as the validation list is (plain tensors, cached)
        hooks["test_loader"] = make_loader(parser, test_items, **{**kwargs, "dataset": None, "plain": True,
                                                                  "log": lambda *_a, **_k: None})
        return make_loader(parser, items, **kwargs)

    def evaluator(parser, network, data, device, **kwargs):  # the same network (the averaged weights), precision
        built = make_evaluator(parser, network, data, device, **kwargs)
        hooks["test"] = make_evaluator(_FreshMetrics(parser), network, hooks["test_loader"], device, **kwargs)
        return built

    train.validation_loader, train.build_evaluator = loader, evaluator
    validate = handlers.EpochValidation.__call__
    started = [time.perf_counter()]

    def both(self, trainer):
        epoch = trainer.state.epoch
        validate(self, trainer)  # the engine's validation on dev: what the rule reads
        if self.evaluator.state.epoch != epoch or not self.evaluator.state.metrics:
            return
        dev = _details(self.evaluator)
        hooks["test"].run(global_epoch=epoch)
        record = {"epoch": epoch, "dev_metric": float(self.evaluator.state.metrics[KEY]), "dev": dev,
                  "test": _details(hooks["test"]), "s": round(time.perf_counter() - started[0], 1)}
        started[0] = time.perf_counter()
        print(MARK + json.dumps(record), flush=True)

    handlers.EpochValidation.__call__ = both
    from mmar.cli import main

    return main(["train", args.mmar, "--set", "train#num_workers=0", *args.set])


# ---- one seed ------------------------------------------------------------------------------------------


def run_seed(data: Path, seed: int, *, epochs: int | None, holdout: float, sets: list[str], threads: int,
             work: Path, log=print) -> dict:
    data = Path(data)
    datalist = json.loads((data / "datalist.json").read_text())
    train_items, dev_items = split(datalist["training"], seed, holdout)
    test_items = _absolute(datalist["validation"], data)
    folder = work / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "datalist.json").write_text(json.dumps({"training": _absolute(train_items, data),
                                                      "validation": _absolute(dev_items, data)}, indent=1))
    (folder / "test.json").write_text(json.dumps(test_items, indent=1))
    mmar = folder / "mmar"
    subprocess.run([sys.executable, "-m", "mmar", "init", str(mmar), "--task", "segmentation", "--datalist",
                    str(folder / "datalist.json"), "--force", *(["--epochs", str(epochs)] if epochs else [])],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    for stale in ("train_state.pt", "model.ckpt", "model_final.ckpt"):
        (mmar / "models" / stale).unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "worker", "--mmar", str(mmar), "--test",
               str(folder / "test.json"), "--threads", str(threads), "--set", f"determinism#random_seed={seed}",
               *sets]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    history, lines, started = [], [], time.time()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env=env) as process:
        for line in process.stdout:
            if line.startswith(MARK):
                history.append(json.loads(line[len(MARK):]))
                h = history[-1]
                log(json.dumps({"seed": seed, "epoch": h["epoch"], "dev": round(h["dev_metric"], 4),
                                "test": round(_mean_dice(h["test"]), 4), "s": h["s"]}))
            else:
                lines.append(line.rstrip())
    if process.returncode != 0 or not history:
        raise RuntimeError(f"mmar train failed (exit {process.returncode}):\n" + "\n".join(lines[-30:]))
    import torch

    state = torch.load(mmar / "models" / "train_state.pt", map_location="cpu", weights_only=False)
    progress = state["progress"]
    config = json.loads((mmar / "config" / "config_train.json").read_text())
    return {"task": "segmentation", "data": data.name, "seed": seed, "holdout": holdout, "sets": sets,
            "epochs": len(history), "train_cases": len(train_items), "dev_cases": len(dev_items),
            "test_cases": len(test_items), "spatial_size": config.get("spatial_size"),
            "engine": {"rule": progress.get("selection_rule"), "epoch": progress.get("best_epoch")},
            "train_s": round(time.time() - started, 1), "history": history}


# ---- offline: the rules on recorded runs ---------------------------------------------------------------


def _array(rows) -> np.ndarray:
    return np.asarray([[math.nan if v is None else v for v in row] for row in rows], dtype=float)


def _mean_dice(rows) -> float:
    """The key metric as MeanDice reduces it ("mean", MONAI's `do_metric_reduction`): each case's mean over its
    defined classes, then the mean over cases (= the engine's `val_mean_dice`, recorded as `dev_metric`)."""
    array = _array(rows)
    with np.errstate(all="ignore"):
        per_case = [float(np.nanmean(row)) for row in array if np.isfinite(row).any()]
    return float(np.mean(per_case)) if per_case else math.nan


def _noise(rows) -> float:
    from mmar.engine.handlers import metric_noise

    return metric_noise(_array(rows))


def interval_width(rows) -> float:
    """The width of the 95 % bootstrap interval of the mean Dice (cases resampled), as `mmar validate` has it."""
    from mmar.engine import intervals

    array = _array(rows)
    found = intervals.segmentation(array, 1, KEY, [str(i) for i in range(len(array))], "case",
                                   intervals.settings({}))
    return found[KEY]["upper"] - found[KEY]["lower"]


def curves(run: dict) -> dict:
    """Per epoch: dev mean Dice, its standard error (the rule's noise), test mean Dice."""
    return {"dev": [_mean_dice(h["dev"]) for h in run["history"]], "noise": [_noise(h["dev"]) for h in run["history"]],
            "test": [_mean_dice(h["test"]) for h in run["history"]]}


def replay(run: dict) -> dict:
    """Each rule's pick on one run: the epoch, its test and dev mean Dice."""
    from mmar.engine.selection import replay as replay_rule

    c = curves(run)
    out = {}
    for name in shared.rules():
        epoch = replay_rule(name, c["dev"], c["noise"])
        out[name] = {"epoch": epoch, "test_dice": c["test"][epoch - 1], "dev_dice": c["dev"][epoch - 1]}
    return out


def table(runs: list[dict], widths: bool = True) -> str:
    picks = [replay(run) for run in runs]
    all_curves = [curves(run) for run in runs]
    oracle = [max(c["test"]) for c in all_curves]
    first = runs[0]
    lines = [f"{len(runs)} seeds ({', '.join(str(r['seed']) for r in runs)}), {first['data']}, "
             f"{first['train_cases']} train / {first['dev_cases']} dev / {first['test_cases']} test cases (the shared "
             f"validation list), {first['epochs']} epochs; oracle (best test epoch) median "
             f"{statistics.median(oracle):.4f}",
             "", *shared.rule_rows(picks, "test_dice", "test mean Dice", extra=("dev_dice", "dev mean Dice")), "",
             "| seed | `best`: epoch, test | last: epoch, test | `within_noise`: epoch, test | within_noise - best "
             "| within_noise - last | best - last | dev SE (median over epochs) | dev 95 % interval width "
             "(last epoch) | test 95 % width (last epoch) | engine's pick (rule) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, pick, c in zip(runs, picks, all_curves):
        b, f, w = pick["best"], pick["last"], pick["within_noise"]
        dev_width = interval_width(run["history"][-1]["dev"]) if widths else math.nan
        test_width = interval_width(run["history"][-1]["test"]) if widths else math.nan
        engine = run.get("engine") or {}
        lines.append(
            f"| {run['seed']} | {b['epoch']}, {b['test_dice']:.4f} | {f['epoch']}, {f['test_dice']:.4f} "
            f"| {w['epoch']}, {w['test_dice']:.4f} | {w['test_dice'] - b['test_dice']:+.4f} "
            f"| {w['test_dice'] - f['test_dice']:+.4f} | {b['test_dice'] - f['test_dice']:+.4f} "
            f"| {statistics.median(c['noise']):.4f} | {dev_width:.4f} | {test_width:.4f} "
            f"| {engine.get('epoch')} ({engine.get('rule')}) |")
    agree = [(r.get("engine") or {}).get("epoch") == p[(r.get("engine") or {}).get("rule", "")]["epoch"]
             for r, p in zip(runs, picks) if (r.get("engine") or {}).get("rule") in p]
    lines += ["", f"the engine's own pick equals the replay of its rule in {sum(agree)} of {len(agree)} runs"]
    lines.append("dev mean Dice per epoch (seed: values): " + "; ".join(
        f"{r['seed']}: " + " ".join(f"{v:.3f}" for v in c["dev"]) for r, c in zip(runs, all_curves)))
    lines.append("test mean Dice per epoch (seed: values): " + "; ".join(
        f"{r['seed']}: " + " ".join(f"{v:.3f}" for v in c["test"]) for r, c in zip(runs, all_curves)))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--data", default=str(DEFAULT_DATA), help="a folder with datalist.json (training, validation)")
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument("--epochs", type=int, help="default: mmar init's for the train split")
    run.add_argument("--holdout", type=float, default=0.3)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more mmar train overrides")
    run.add_argument("--work", help="where the MMARs go (default: a temp folder)")
    run.add_argument("--out", default="selection-segmentation.jsonl")
    show = sub.add_parser("table")
    show.add_argument("records", nargs="+")
    worker = sub.add_parser("worker")
    worker.add_argument("--mmar", required=True)
    worker.add_argument("--test", required=True)
    worker.add_argument("--threads", type=int, default=1)
    worker.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args(argv)
    if args.command == "worker":
        return _worker(args)
    if args.command == "run":
        work = Path(args.work or tempfile.mkdtemp(prefix="bench-selection-seg-"))
        for seed in (int(s) for s in args.seeds.split(",")):
            result = run_seed(Path(args.data), seed, epochs=args.epochs, holdout=args.holdout, sets=args.set,
                              threads=args.threads, work=work)
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(result) + "\n")
        return 0
    runs = [json.loads(line) for path in args.records for line in Path(path).read_text().splitlines() if line]
    for data in sorted({r["data"] for r in runs}):
        print(table([r for r in runs if r["data"] == data]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
