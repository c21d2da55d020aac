"""bench/model_selection.py's offline part: every rule replayed on recorded runs and scored on dev-test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


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
