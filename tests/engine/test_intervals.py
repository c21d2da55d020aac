"""Bootstrap intervals in eval/metrics.json (mmar.engine.intervals) and the gate on their lower bound, through
the real CLI on tiny generated data (issue 35)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_CLASSIFICATION, run_mmar


# ---- units ----------------------------------------------------------------------------------------


def test_rank_auc_is_the_auc_metrics_json_reports_ties_included():
    from mmar.classification_metrics import label_aucs
    from mmar.engine.intervals import fast_aucs
    from mmar.label_format import LabelFormat

    rng = np.random.default_rng(0)
    probs = np.round(rng.random((60, 4)), 1)  # many ties
    labels = np.stack([rng.integers(0, 2, 60), rng.integers(0, 3, 60)], axis=1).astype(float)
    fmt = LabelFormat((1, 3), ("a", "b"))
    expected = label_aucs(torch.tensor(probs), torch.tensor(labels), fmt)
    assert fast_aucs(probs, labels, fmt.sizes) == pytest.approx(expected, abs=1e-6)  # MONAI: float32


def test_the_interval_is_seeded_and_resamples_whole_patients():
    from mmar.engine import intervals
    from mmar.label_format import LabelFormat

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (40, 1)).astype(float)
    probs = np.clip(labels * 0.3 + rng.random((40, 1)) * 0.7, 0, 1)
    fmt = LabelFormat((1,), ("x",))
    settings = {**intervals.DEFAULTS, "resamples": 300}
    items = [{"image": f"{i}.png", "patient": f"p{i // 4}"} for i in range(40)]
    units, unit = intervals.units_of(items, "patient")
    assert unit == "patient" and len(set(units)) == 10
    first = intervals.classification(probs, labels, fmt, "val_mean_auc", units, unit, settings)
    again = intervals.classification(probs, labels, fmt, "val_mean_auc", units, unit, settings)
    assert first == again and first["unit"] == "patient" and first["units"] == 10
    by_case = intervals.classification(probs, labels, fmt, "val_mean_auc", *intervals.units_of(items[:39] + [{}], "patient"),
                                       settings)
    assert by_case["unit"] == "case" and by_case["units"] == 40  # one item without `patient`: every case is a unit
    # 10 clusters of 4 correlated draws vary more than 40 independent ones
    width = lambda found: found["val_mean_auc"]["upper"] - found["val_mean_auc"]["lower"]  # noqa: E731
    assert width(first) > 0 and width(by_case) > 0
    point = intervals.fast_aucs(probs, labels, (1,))[0]
    assert first["val_mean_auc"]["lower"] <= point <= first["val_mean_auc"]["upper"]


def test_segmentation_interval_brackets_the_mean_dice_over_cases():
    from mmar.engine import intervals

    details = np.array([[0.9, 0.8], [0.7, np.nan], [0.95, 0.85], [0.6, 0.5], [0.88, 0.9]])
    found = intervals.segmentation(details, 1, "val_mean_dice", *intervals.units_of([{}] * 5, "patient"),
                                   {**intervals.DEFAULTS, "resamples": 500})
    point = float(np.nanmean(np.nanmean(details, axis=1)))  # per case, then over cases: MeanDice's "mean"
    assert found["val_mean_dice"]["lower"] <= point <= found["val_mean_dice"]["upper"]
    assert set(found["dice_per_class"]) == {"1", "2"} and found["unit"] == "case"


def test_the_intervals_mean_dice_is_monais_reduction():
    """The interval's statistic is the key metric itself: MONAI's MeanDice reduction, cases missing a class
    (NaN) included, which a mean over every defined (case, class) Dice is not."""
    import torch
    from monai.metrics.utils import do_metric_reduction

    from mmar.engine import intervals

    details = np.array([[0.9, np.nan, 0.2], [0.7, 0.1, np.nan], [np.nan, np.nan, np.nan], [0.6, 0.5, 0.4]])
    monai_value, _ = do_metric_reduction(torch.tensor(details, dtype=torch.float32), "mean")
    assert intervals.mean_dice(details) == pytest.approx(float(monai_value), abs=1e-6)
    assert intervals.mean_dice(details) != pytest.approx(float(np.nanmean(details)), abs=1e-3)
    assert np.isnan(intervals.mean_dice(np.full((2, 2), np.nan)))


def test_gate_reads_the_bounds_of_the_intervals():
    from mmar import gate

    metrics = {"val_mean_auc": 0.9, "intervals": {"val_mean_auc": {"lower": 0.7, "upper": 0.97},
                                                  "auc_per_label": {"a": {"lower": None, "upper": None}},
                                                  "level": 0.95, "unit": "case"}}
    flat = gate.with_interval_bounds(metrics)
    assert flat["val_mean_auc.lower"] == 0.7 and flat["val_mean_auc.upper"] == 0.97
    assert flat["auc_per_label.a.lower"] is None and "level" not in {k.split(".")[-1] for k in flat if "." in k}
    assert gate.with_interval_bounds({"val_mean_auc": 0.9}) == {"val_mean_auc": 0.9}


# ---- through the CLI --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validated_cls(tmp_path_factory):
    """A classification MMAR trained 2 epochs and validated, its datalist naming 2 images per patient."""
    from mmar.archive import load_archive
    from mmar.scaffold import init
    from mmar.synthetic import write_classification_dataset

    data = write_classification_dataset(tmp_path_factory.mktemp("ivdata"), cases=24, size=32, seed=5)
    datalist = json.loads(Path(data).read_text())
    for index, item in enumerate(datalist["validation"]):
        item["patient"] = f"p{index // 2}"
    Path(data).write_text(json.dumps(datalist))
    root = tmp_path_factory.mktemp("iv") / "mmar"
    init(root, task="classification", datalist=data, epochs=2, log=lambda *_: None)
    config = load_archive(root, SMALL_CLASSIFICATION).config
    (root / "config" / "config_train.json").write_text(json.dumps(config, indent=2))
    run_mmar("train", str(root))
    run = run_mmar("validate", str(root))
    return root, json.loads((root / "eval" / "metrics.json").read_text()), run.stdout, len(datalist["validation"])


def test_validate_writes_the_interval_of_the_key_metric_and_per_label(validated_cls):
    root, metrics, stdout, cases = validated_cls
    interval = metrics["intervals"]
    point = metrics["val_mean_auc"]
    assert interval["level"] == 0.95 and interval["resamples"] == 2000 and interval["seed"] == 0
    assert interval["unit"] == "patient" and interval["units"] == math.ceil(cases / 2)
    assert interval["val_mean_auc"]["lower"] <= point <= interval["val_mean_auc"]["upper"]
    for name, auc in metrics["auc_per_label"].items():
        bounds = interval["auc_per_label"][name]
        if auc is None:
            assert bounds["lower"] is None or bounds["lower"] <= bounds["upper"]
        else:
            assert bounds["lower"] <= auc <= bounds["upper"]
    assert "val_mean_auc: 95 % bootstrap interval" in stdout and "patients)" in stdout
    # the same predictions, the same interval (seeded)
    run_mmar("validate", str(root))
    assert json.loads((root / "eval" / "metrics.json").read_text())["intervals"] == interval


def test_a_gate_on_the_lower_bound_refuses_where_the_point_estimate_passes(validated_cls, tmp_path):
    source, metrics, _, _ = validated_cls
    root = tmp_path / "mmar"
    shutil.copytree(source, root)
    point, lower = metrics["val_mean_auc"], metrics["intervals"]["val_mean_auc"]["lower"]
    assert lower < point, "a tiny validation list has a wide interval"
    bar = round((lower + point) / 2, 4)
    passed = run_mmar("--gate", f"val_mean_auc>={bar}", "infer", str(root))
    assert "gate: val_mean_auc" in passed.stdout and "skipped" not in passed.stdout
    refused = run_mmar("--gate", f"val_mean_auc.lower>={bar}", "infer", str(root))
    assert refused.returncode == 0
    assert f"gate: infer skipped: val_mean_auc.lower {lower:.4g} < {bar}" in refused.stdout


def test_a_gate_on_a_bound_that_metrics_json_lacks_names_the_metrics(validated_cls, tmp_path):
    source, _, _, _ = validated_cls
    root = tmp_path / "mmar"
    shutil.copytree(source, root)
    path = root / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["intervals"]  # as an older mmar wrote it
    path.write_text(json.dumps(metrics))
    refused = run_mmar("--gate", "val_mean_auc.lower>=0.1", "infer", str(root), check=False)
    assert refused.returncode != 0 and "'val_mean_auc.lower' is not in eval/metrics.json" in refused.stdout + refused.stderr


def test_segmentation_validate_writes_the_interval_of_the_mean_dice(trained_seg_mmar, tmp_path):
    root = tmp_path / "mmar"
    shutil.copytree(trained_seg_mmar, root)
    run_mmar("validate", str(root))
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    interval = metrics["intervals"]
    assert interval["unit"] == "case" and interval["units"] == metrics["num_cases"]
    assert interval["val_mean_dice"]["lower"] <= metrics["val_mean_dice"] <= interval["val_mean_dice"]["upper"]
    assert set(interval["dice_per_class"]) == set(metrics["dice_per_class"])
