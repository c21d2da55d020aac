"""bench/weight_average.py: the trained weights and moving averages of them, validated in one training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_the_paired_run_leaves_the_engine_its_own_average(seg_data, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "weight_average.py"), "--data", str(seg_data.parent), "--epochs", "2",
         "--decays", "0.5", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    records = json.loads((out / "weights.json").read_text())
    assert [r["epoch"] for r in records] == [1, 2]  # stopped after --epochs, not the default run's length
    assert all(set(r) == {"epoch", "trained", "ema 0.5", "default"} for r in records)
    assert all(0.0 <= r[k] <= 1.0 for r in records for k in ("trained", "ema 0.5", "default"))
    # the engine validated (and kept its best model by) its own average, restored after the extra variants
    state = torch.load(out / "mmar" / "models" / "train_state.pt", weights_only=False)
    assert [h["val_mean_dice"] for h in state["progress"]["history"]] == [r["default"] for r in records]
    best = torch.load(out / "mmar" / "models" / "model.ckpt", weights_only=False)
    assert best["metric"] == max(r["default"] for r in records)
    assert "first epoch at or above" in result.stdout
