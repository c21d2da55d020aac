"""The model-selection rules of `mmar train` (mmar.engine.selection, issue 35): what each picks, that the
engine decides online as the offline replay does, that a resume decides as an unbroken run, and that the log
and metrics.json say which rule picked which epoch (real CLI, tiny data)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import SMALL_CLASSIFICATION, run_mmar

# a curve like BreastMNIST's: an early lucky peak (epoch 3), a plateau after, a dip
CURVE = [0.60, 0.70, 0.90, 0.80, 0.84, 0.86, 0.87, 0.88, 0.85, 0.87]


def test_each_rule_picks_its_epoch():
    from mmar.engine.selection import replay

    assert replay("best", CURVE) == 3
    assert replay("last", CURVE) == 10
    assert replay("smooth3", CURVE) == 8  # mean of 7-8: 0.870 beats epochs 3-5's 0.847
    assert replay("within_noise", CURVE, [0.05] * 10) == 10  # 0.87 >= 0.90 - 0.05
    assert replay("within_noise", CURVE, [0.01] * 10) == 3  # nothing later is within 0.01 of 0.90
    assert replay("within_noise", CURVE) == 3  # noise unknown: no margin, as `best`
    assert replay("late_best", CURVE) == 8  # epochs 8-10 compete (the last third of 10)


def test_an_undefined_metric_is_never_picked():
    from mmar.engine.selection import replay

    assert replay("best", [math.nan, 0.5, math.nan]) == 2
    assert replay("last", [0.5, math.nan]) == 1
    assert replay("within_noise", [math.nan, math.nan]) == 0


def test_hanley_mcneil_is_the_textbook_value():
    from mmar.engine.selection import auc_standard_error, hanley_mcneil

    # Hanley & McNeil 1982, eq. 2 by hand: AUC 0.8, 50 / 50 cases, Q1 = 0.8 / 1.2, Q2 = 1.28 / 1.8
    q1, q2 = 0.8 / 1.2, 1.28 / 1.8
    by_hand = math.sqrt((0.8 * 0.2 + 49 * (q1 - 0.64) + 49 * (q2 - 0.64)) / 2500)
    assert hanley_mcneil(0.8, 50, 50) == pytest.approx(by_hand) == pytest.approx(0.0445, abs=1e-4)
    probs = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.6])
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0])
    assert 0 < auc_standard_error(probs, labels) < 0.2


def _run_saver(rule, values, noise, tmp_path):
    from mmar.engine.handlers import BestModelSaver, Progress

    progress = Progress("val_mean_auc", rule=rule)
    evaluator = SimpleNamespace(state=SimpleNamespace(epoch=0, metrics={}, metric_details={}))
    saver = BestModelSaver(progress, evaluator, torch.nn.Linear(2, 1), tmp_path, {}, log=lambda *_: None)
    for epoch, (value, se) in enumerate(zip(values, noise), start=1):
        evaluator.state.epoch, evaluator.state.metrics = epoch, {"val_mean_auc": value}
        evaluator.state.metric_details = {"val_mean_auc": {"mean_auc": value, "mean_auc_standard_error": se}}
        saver(SimpleNamespace(state=SimpleNamespace(epoch=epoch, max_epochs=len(values))))
    return progress


@pytest.mark.parametrize("rule", ["best", "last", "smooth3", "within_noise", "late_best"])
def test_the_engine_decides_online_as_the_replay_does(rule, tmp_path):
    from mmar.engine.selection import replay

    noise = [0.03] * len(CURVE)
    progress = _run_saver(rule, CURVE, noise, tmp_path)
    saved = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert progress.best_epoch == replay(rule, CURVE, noise) == saved["epoch"]
    assert saved["selection"]["rule"] == rule and saved["selection"]["epoch"] == saved["epoch"]
    assert saved["selection"]["value"] == pytest.approx(CURVE[saved["epoch"] - 1])


def test_a_resumed_run_decides_as_an_unbroken_one(tmp_path):
    from mmar.engine.handlers import Progress

    noise = [0.05] * len(CURVE)
    whole = _run_saver("within_noise", CURVE, noise, tmp_path / "a")
    first = _run_saver("within_noise", CURVE[:5], noise[:5], tmp_path / "b")
    resumed = Progress("val_mean_auc", rule="within_noise")
    resumed.load_state_dict(first.state_dict())
    assert resumed.validations == first.validations
    # a state written before the rules (no `validations`): rebuilt from the history, without the noise
    old = {k: v for k, v in first.state_dict().items() if k != "validations"}
    old["history"] = [{"epoch": e, "val_mean_auc": v} for e, v in enumerate(CURVE[:5], start=1)]
    rebuilt = Progress("val_mean_auc", rule="within_noise")
    rebuilt.load_state_dict(old)
    assert rebuilt.validations["values"] == CURVE[:5] and all(math.isnan(n) for n in rebuilt.validations["noise"])
    assert whole.best_epoch == 10


def test_the_noise_of_a_segmentation_metric_comes_from_its_cases():
    from mmar.engine.handlers import metric_noise

    details = torch.tensor([[0.8, 0.9], [0.6, float("nan")], [0.7, 0.7]])
    per_case = torch.tensor([0.85, 0.6, 0.7])
    assert metric_noise(details) == pytest.approx(float(per_case.std() / math.sqrt(3)), rel=1e-5)
    assert math.isnan(metric_noise(None)) and math.isnan(metric_noise({"mean_auc": 0.5}))


def test_train_log_and_metrics_json_name_the_rule_and_the_epoch(tmp_path):
    from mmar.archive import load_archive
    from mmar.engine.selection import RULE
    from mmar.scaffold import init
    from mmar.synthetic import write_classification_dataset

    data = write_classification_dataset(tmp_path / "data", cases=18, size=32, seed=3)
    root = tmp_path / "mmar"
    init(root, task="classification", datalist=data, epochs=3, log=lambda *_: None)
    config = load_archive(root, SMALL_CLASSIFICATION).config
    (root / "config" / "config_train.json").write_text(json.dumps(config, indent=2))
    trained = run_mmar("train", str(root))
    assert f"model selection: rule {RULE}" in trained.stdout
    assert f"(rule {RULE}: " in trained.stdout  # on the line of every new model.ckpt
    run_mmar("validate", str(root))
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    best = torch.load(root / "models" / "model.ckpt", weights_only=False)
    assert metrics["selection"]["rule"] == RULE and metrics["selection"]["epoch"] == best["epoch"]
    assert metrics["selection"]["key_metric"] == "val_mean_auc" and metrics["selection"]["why"]
    assert "mean_auc_standard_error" in metrics
