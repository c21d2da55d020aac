"""metrics.json is strict JSON: an undefined metric is `null` and named, never a bare `NaN` (issue 23)."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_mmar
from mmar.engine.metrics_json import is_undefined, nulls_for_undefined, undefined_names

# a small network whatever the default is, so that these tests stay fast
TINY_NETWORK = {"_target_": "monai.networks.nets.DenseNet", "spatial_dims": 2, "in_channels": 1,
                "out_channels": "$sum(@label_format)", "init_features": 8, "growth_rate": 8, "block_config": [2, 2]}


def strict_load(path):
    """json.loads that refuses NaN / Infinity, as JSON.parse, Go and a Kubernetes status patch do."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_undefined_numbers_become_null_at_any_depth():
    data = {"a": float("nan"), "b": [1.0, float("inf"), {"c": np.float32("nan")}], "d": torch.tensor(float("-inf")),
            "e": 0.5, "f": True, "g": None, "h": "NaN", "i": np.float64(0.25)}
    clean = nulls_for_undefined(data)
    assert clean["a"] is None and clean["b"][1] is None and clean["b"][2]["c"] is None and clean["d"] is None
    assert clean["e"] == 0.5 and clean["f"] is True and clean["g"] is None and clean["h"] == "NaN"
    assert clean["i"] == 0.25
    json.dumps(clean, allow_nan=False, default=lambda v: v.item())  # would raise on any NaN left
    assert is_undefined(float("nan")) and not is_undefined(1.0) and not is_undefined(False)
    assert undefined_names({"x": float("nan"), "y": 0.7, "z": None}) == ["x", "z"]


def test_segmentation_names_classes_without_dice():
    from types import SimpleNamespace

    from mmar.tasks import segmentation

    details = torch.tensor([[0.8, float("nan")], [0.6, float("nan")]])
    evaluator = SimpleNamespace(state=SimpleNamespace(metric_details={"val_mean_dice": details}))
    config = {"validate": {"key_metric": "val_mean_dice", "metrics": {"val_mean_dice": {"include_background": False}}}}
    summary = segmentation.summarize(evaluator, None, config)
    assert summary["classes_without_dice"] == ["2"]
    assert summary["dice_per_class"]["1"] == pytest.approx(0.7)
    assert nulls_for_undefined(summary)["dice_per_class"]["2"] is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mmar.scaffold import init
    from mmar.synthetic import write_classification_dataset

    datalist = write_classification_dataset(tmp_path_factory.mktemp("data"), cases=12, size=32, seed=3)
    root = tmp_path_factory.mktemp("cls") / "mmar"
    init(root, task="classification", datalist=datalist, epochs=1, log=lambda *_: None)
    config_file = root / "config" / "config_train.json"
    config = json.loads(config_file.read_text())
    config["network"] = TINY_NETWORK
    config["train"]["batch_size"] = 8
    config_file.write_text(json.dumps(config))
    run_mmar("train", str(root))
    return root, datalist


def with_validation_labels(datalist, out, change):
    data = json.loads(datalist.read_text())
    data["validation"] = [{**item, "image": str(datalist.parent / item["image"]), "label": change(item["label"])}
                          for item in data["validation"]]
    out.write_text(json.dumps(data))
    return out


def test_a_label_without_positives_is_null_and_listed(trained, tmp_path):
    root, datalist = trained
    no_disk = with_validation_labels(datalist, tmp_path / "no_disk.json", lambda label: [0, *label[1:]])
    result = run_mmar("validate", str(root), "--set", f"DATASET_JSON={no_disk}")
    metrics = strict_load(root / "eval" / "metrics.json")
    assert metrics["auc_per_label"]["disk"] is None
    assert metrics["labels_without_auc"] == ["disk"]
    assert isinstance(metrics["val_mean_auc"], float) and math.isfinite(metrics["val_mean_auc"])
    assert "NaN" not in (root / "eval" / "metrics.json").read_text() and "NaN" not in result.stdout


def test_no_label_with_an_auc_leaves_the_key_metric_null(trained, tmp_path):
    root, datalist = trained
    one_class = with_validation_labels(datalist, tmp_path / "one_class.json", lambda label: [0, 0, 0])
    result = run_mmar("validate", str(root), "--set", f"DATASET_JSON={one_class}")
    metrics = strict_load(root / "eval" / "metrics.json")
    assert metrics["val_mean_auc"] is None
    assert metrics["labels_without_auc"] == ["disk", "bar", "square_position"]
    assert all(value is None for value in metrics["auc_per_label"].values())
    assert metrics["accuracy"] is not None  # accuracy is defined with a single class
    assert "undefined" in result.stdout + result.stderr
