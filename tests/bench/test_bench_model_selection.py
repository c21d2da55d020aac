"""bench/model_selection.py's offline part: every rule replayed on recorded runs and scored on dev-test."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("model_selection", ROOT / "bench" / "model_selection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(seed: int, epochs: int = 9) -> dict:
    rng = np.random.default_rng(seed)
    val_labels = [0, 1] * 10
    test_labels = [1, 0] * 10
    history = []
    for epoch in range(1, epochs + 1):
        skill = epoch / epochs
        val = [float(np.clip(y * skill + rng.random() * (1 - skill), 0, 1)) for y in val_labels]
        test = [float(np.clip(y * skill + rng.random() * (1 - skill), 0, 1)) for y in test_labels]
        history.append({"epoch": epoch, "val_bf16": val, "val_fp32": val, "test_fp32": test, "test_bf16": test})
    return {"data": "breastmnist", "seed": seed, "epochs": epochs, "val_labels": val_labels, "test_labels": test_labels,
            "history": history}


def test_table_scores_every_rule_on_dev_test_and_the_precision_line():
    bench = load_bench()
    runs = [fake_run(0), fake_run(1)]
    table = bench.table(runs)
    for rule in ("best", "last", "smooth3", "within_noise", "late_best"):
        assert f"| `{rule}` |" in table
    picks = bench.replay(runs[0])
    assert picks["last"]["epoch"] == 9
    assert picks["last"]["test_auc"] == bench._auc(runs[0]["history"][-1]["test_fp32"], runs[0]["test_labels"])
    assert "differs in 0 of 2 runs" in bench.precision_table(runs)  # the same predictions in both precisions


# ---- segmentation (bench/model_selection_segmentation.py) -------------------------------------------


def load_segmentation_bench():
    load_bench()  # model_selection importable by name: the segmentation bench shares its table code
    spec = importlib.util.spec_from_file_location("model_selection_segmentation",
                                                  ROOT / "bench" / "model_selection_segmentation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_segmentation_run(seed: int, dev_curve: list[float], test_curve: list[float]) -> dict:
    """Per-case Dice (cases x 2 classes) whose per-epoch mean is the curve's value: 12 dev cases at +-0.05 (a
    standard error of 0.015), 10 test cases; dev's first case lacks class 1 (None, as MeanDice's NaN)."""
    history = []
    for epoch, (dev, test) in enumerate(zip(dev_curve, test_curve), start=1):
        dev_rows = [[round(dev + (0.05 if i % 2 else -0.05), 5)] * 2 for i in range(12)]
        dev_rows[0][0] = None
        test_rows = [[round(test + (0.03 if i % 2 else -0.03) + seed * 0.001, 5)] * 2 for i in range(10)]
        history.append({"epoch": epoch, "dev": dev_rows, "test": test_rows, "dev_metric": None, "s": 1.0})
    return {"task": "segmentation", "data": "tiny", "seed": seed, "epochs": len(history), "train_cases": 28,
            "dev_cases": 12, "test_cases": 10, "engine": {"rule": "within_noise", "epoch": None}, "history": history}


def test_segmentation_replay_uses_the_engines_metric_and_noise_and_scores_test():
    bench = load_segmentation_bench()
    from mmar.engine import selection
    from mmar.engine.handlers import metric_noise

    # dev peaks by a hair at epoch 3, then stays within its noise: `best` keeps epoch 3, `within_noise` the last
    run = fake_segmentation_run(0, [0.5, 0.7, 0.84, 0.83, 0.83, 0.83], [0.5, 0.7, 0.80, 0.82, 0.83, 0.84])
    curves = bench.curves(run)
    rows = run["history"][2]["dev"]
    # MeanDice's reduction: each case's mean over its defined classes, then the mean over cases
    assert curves["dev"][2] == pytest.approx(np.mean([np.mean([v for v in row if v is not None]) for row in rows]))
    assert curves["dev"][2] == pytest.approx(0.84)
    assert curves["noise"][2] == pytest.approx(metric_noise(bench._array(rows))) == pytest.approx(0.0151, abs=1e-4)
    picks = bench.replay(run)
    assert picks["best"]["epoch"] == selection.replay("best", curves["dev"], curves["noise"]) == 3
    assert picks["within_noise"]["epoch"] == selection.replay("within_noise", curves["dev"], curves["noise"]) == 6
    assert picks["last"]["epoch"] == 6
    assert picks["last"]["test_dice"] == pytest.approx(0.84) and picks["best"]["test_dice"] == pytest.approx(0.80)


def test_segmentation_table_has_every_rule_the_per_seed_differences_and_interval_widths():
    bench = load_segmentation_bench()
    runs = [fake_segmentation_run(seed, [0.5, 0.7, 0.84, 0.83, 0.83, 0.83], [0.5, 0.7, 0.80, 0.82, 0.83, 0.84])
            for seed in (0, 1)]
    for run in runs:
        run["engine"]["epoch"] = 6
    table = bench.table(runs)
    for rule in ("best", "last", "smooth3", "within_noise", "late_best"):
        assert f"| `{rule}` |" in table
    assert "| `within_noise` | 6, 6 |" in table and "| `best` | 3, 3 |" in table
    assert "| 0 | 3, 0.8000 | 6, 0.8400 | 6, 0.8400 | +0.0400 | +0.0000 | -0.0400 |" in table  # one line per seed
    assert "the engine's own pick equals the replay of its rule in 2 of 2 runs" in table
    width = bench.interval_width(runs[0]["history"][-1]["dev"])  # mmar.engine.intervals, cases resampled
    assert 0.03 < width < 0.09 and f"{width:.4f}" in table


def test_segmentation_run_on_tiny_generated_data_trains_scores_dev_and_test_each_epoch(tmp_path):
    """The real `mmar train` of the default segmentation MMAR (a small network), its dev list the seed's 30 % of
    `training`, the datalist's `validation` scored every epoch beside it; the engine's pick = the replay."""
    from conftest import SMALL_SEGMENTATION
    from mmar.synthetic import write_segmentation_dataset

    bench = load_segmentation_bench()
    data = write_segmentation_dataset(tmp_path / "data", cases=8, size=16, seed=3).parent
    run = bench.run_seed(data, 5, epochs=2, holdout=0.3, sets=SMALL_SEGMENTATION, threads=1, work=tmp_path / "work",
                         log=lambda *_: None)
    assert (run["train_cases"], run["dev_cases"], run["test_cases"]) == (4, 2, 2)
    assert [h["epoch"] for h in run["history"]] == [1, 2]
    for h in run["history"]:
        assert len(h["dev"]) == 2 and len(h["test"]) == 2 and all(len(row) == 2 for row in h["dev"] + h["test"])
        assert bench._mean_dice(h["dev"]) == pytest.approx(h["dev_metric"], abs=1e-4)  # the engine's val_mean_dice
    assert run["engine"]["rule"] == "within_noise"
    assert run["engine"]["epoch"] == bench.replay(run)["within_noise"]["epoch"]
    # train and dev are disjoint, drawn from `training` only; test is the `validation` list
    written = json.loads((tmp_path / "work" / "seed5" / "datalist.json").read_text())
    source = json.loads((data / "datalist.json").read_text())
    names = {Path(i["image"]).name for i in written["training"]}, {Path(i["image"]).name for i in written["validation"]}
    assert not names[0] & names[1] and names[0] | names[1] == {Path(i["image"]).name for i in source["training"]}
    out = tmp_path / "records.jsonl"
    out.write_text(json.dumps(run) + "\n")
    shown = subprocess.run([sys.executable, str(ROOT / "bench" / "model_selection.py"), "table", str(out)],
                           capture_output=True, text=True, check=True).stdout
    assert "| `within_noise` |" in shown and "test mean Dice" in shown
