"""init -> train -> validate -> infer for 2D multi-label classification on tiny generated PNGs (real CLI)."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL_CLASSIFICATION, run_mmar

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory):
    from mmar.synthetic import write_classification_dataset

    return write_classification_dataset(tmp_path_factory.mktemp("clsdata"), cases=18, size=32, seed=3)


def make_cls_mmar(root, datalist, epochs=2, extra=()):
    from mmar.archive import load_archive
    from mmar.scaffold import init

    init(root, task="classification", datalist=datalist, epochs=epochs, log=lambda *_: None)
    archive = load_archive(root, [*SMALL_CLASSIFICATION, *extra])
    (root / "config" / "config_train.json").write_text(json.dumps(archive.config, indent=2))
    return root


@pytest.fixture(scope="session")
def trained_cls_mmar(tmp_path_factory, cls_data):
    root = make_cls_mmar(tmp_path_factory.mktemp("cls") / "mmar", cls_data, epochs=3)
    run_mmar("train", str(root))
    return root


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_init_writes_the_measured_recipe_for_the_label_format(tmp_path, cls_data):
    root = tmp_path / "mmar"
    run_mmar("init", str(root), "--task", "classification", "--datalist", str(cls_data))
    config = json.loads((root / "config" / "config_train.json").read_text())
    network = config["network"]
    assert network["_target_"] == "monai.networks.nets.DenseNet121"
    assert network["spatial_dims"] == 2 and network["in_channels"] == 1
    assert config["train"]["ema"] == {"decay": 0.99} and config["train"]["mixup"] == {"alpha": 1.0}
    assert config["epochs"] == 200  # 600 steps of 32 images: a 14-image list is capped at 200 epochs
    assert config["label_format"] == [1, 1, 3] and config["label_names"] == ["disk", "bar", "square_position"]
    assert config["spatial_size"] == [32, 32]
    assert config["validate"]["key_metric"] == "val_mean_auc"
    env = json.loads((root / "config" / "environment.json").read_text())
    assert env["PROCESSING_TASK"] == "classification"
    from mmar.archive import load_archive

    network = load_archive(root).parser().get_parsed_content("network")
    assert network(torch.zeros(2, 1, 32, 32)).shape == (2, 5)  # 1 + 1 + 3 outputs


def test_train_keeps_best_and_final_models_and_logs_per_label_auc(trained_cls_mmar):
    models = trained_cls_mmar / "models"
    best = torch.load(models / "model.ckpt", weights_only=False)
    final = torch.load(models / "model_final.ckpt", weights_only=False)
    state = torch.load(models / "train_state.pt", weights_only=False)
    assert best["key_metric"] == "val_mean_auc" and 0.0 <= best["metric"] <= 1.0
    assert final["epoch"] == 3 and state["complete"]
    history = state["progress"]["history"]
    assert len(history) == 3
    for record in history:
        assert {"auc/disk", "auc/bar", "auc/square_position", "val_accuracy", "val_mean_auc"} <= set(record)
        aucs = [record[f"auc/{n}"] for n in ("disk", "bar", "square_position")]
        assert math.isclose(record["val_mean_auc"], float(np.mean(aucs)), abs_tol=1e-6)
    assert list(models.glob("runs/train-*/events.out.tfevents.*"))


def test_validate_writes_auc_accuracy_and_a_row_per_image(trained_cls_mmar, cls_data):
    run_mmar("validate", str(trained_cls_mmar))
    metrics = json.loads((trained_cls_mmar / "eval" / "metrics.json").read_text())
    assert metrics["key_metric"] == "val_mean_auc"
    per_label = metrics["auc_per_label"]
    assert set(per_label) == {"disk", "bar", "square_position"}
    assert all(0.0 <= v <= 1.0 for v in per_label.values())
    assert math.isclose(metrics["val_mean_auc"], np.mean(list(per_label.values())), abs_tol=1e-6)
    assert set(metrics["accuracy_per_label"]) == set(per_label) and 0.0 <= metrics["accuracy"] <= 1.0
    rows = read_csv(trained_cls_mmar / "eval" / "cases.csv")
    validation = json.loads(cls_data.read_text())["validation"]
    assert len(rows) == 1 + len(validation) == 1 + metrics["num_cases"]
    header = rows[0]
    assert header[:4] == ["image", "disk_true", "bar_true", "square_position_true"]
    for row, item in zip(rows[1:], validation):
        assert row[0] == str(cls_data.parent / item["image"])
        assert [int(v) for v in row[1:4]] == item["label"]


def test_bench_auc_interval_reads_validate_s_table_back_to_its_mean_auc(trained_cls_mmar, tmp_path):
    """bench/auc_interval.py on the cases.csv `mmar validate` wrote (binary and categorical labels): the
    label format read back from the header gives metrics.json's mean AUC, inside its bootstrap interval."""
    import importlib.util

    run_mmar("validate", str(trained_cls_mmar))
    out = trained_cls_mmar / "eval"
    spec = importlib.util.spec_from_file_location("auc_interval", ROOT / "bench" / "auc_interval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    probs, labels, fmt, groups = bench.read_cases(out / "cases.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    assert fmt.names == ("disk", "bar", "square_position") and fmt.sizes == (1, 1, 3)
    value, low, high = bench.interval(probs, labels, fmt, groups, resamples=200, seed=0)
    assert math.isclose(value, metrics["val_mean_auc"], abs_tol=1e-5)
    assert low <= value <= high and low < high
    (tmp_path / "bad.csv").write_text("image,disk_true\na.png,1\n")
    with pytest.raises(SystemExit, match="labels without probabilities: \\['disk'\\]"):
        bench.read_cases(tmp_path / "bad.csv")


def test_infer_writes_probabilities_without_ground_truth(trained_cls_mmar, cls_data, tmp_path):
    data = json.loads(cls_data.read_text())
    images = [str(cls_data.parent / item["image"]) for item in data["training"][:5]]
    test_list = tmp_path / "test.json"
    test_list.write_text(json.dumps({"test": images}))  # plain file names: no labels at all
    out = tmp_path / "out"
    run_mmar("infer", str(trained_cls_mmar), "--key", "test", "--set", f"DATASET_JSON={test_list}",
             f"MMAR_EVAL_OUTPUT_PATH={out}")
    rows = read_csv(out / "predictions.csv")
    assert rows[0] == ["image", "disk", "bar", "square_position=0", "square_position=1", "square_position=2"]
    assert [row[0] for row in rows[1:]] == images
    probs = np.array([[float(v) for v in row[1:]] for row in rows[1:]])
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs[:, 2:].sum(axis=1), 1.0, atol=1e-5)  # softmax over the 3-class segment
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv"]  # no temp files left behind


def test_train_without_validation_list_and_finetune(tmp_path, cls_data, trained_cls_mmar):
    data = json.loads(cls_data.read_text())
    only_training = tmp_path / "train_only.json"
    data.pop("validation")
    data["training"] = [{**item, "image": str(cls_data.parent / item["image"])} for item in data["training"]]
    only_training.write_text(json.dumps(data))
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(trained_cls_mmar, root)
    result = run_mmar("train", str(root), "--finetune", "--set", "epochs=1", f"DATASET_JSON={only_training}",
                      "train#ema#decay=0.9")
    assert "fine-tuning from" in result.stdout and "no 'validation' list" in result.stdout
    final = torch.load(root / "models" / "model_final.ckpt", weights_only=False)
    assert final["epoch"] == 1
    # train#ema works for classification too: with no validation list the latest average is the model
    state = torch.load(root / "models" / "train_state.pt", weights_only=False)
    assert state["ema"]["updates"] == state["trainer"]["iteration"] > 0
    latest = torch.load(root / "models" / "model.ckpt", weights_only=False)["model"]
    for key, value in state["ema"]["weights"].items():
        torch.testing.assert_close(final["model"][key], value, msg=key)
        torch.testing.assert_close(latest[key], value, msg=key)


# ---- image formats -----------------------------------------------------------------------------------


def preprocess(root, path):
    from mmar.archive import load_archive

    parser = load_archive(root, for_validation=True).parser()
    from monai.transforms import Compose

    transform = Compose(parser.get_parsed_content("validate#preprocessing"))
    return transform({"image": str(path), "label": [0, 1, 2]})


def test_8_bit_16_bit_rgb_and_rgba_pngs_read_alike(trained_cls_mmar, tmp_path):
    """The same picture saved four ways gives the same network input (one channel, scaled per image)."""
    from mmar.synthetic import classification_case, save_png

    picture = classification_case(32, [1, 1, 2], np.random.default_rng(0))
    inputs = {}
    for kind in ("8-bit", "16-bit", "RGBA"):
        save_png(picture, tmp_path / f"{kind}.png", kind)
    gray = np.round(picture * 255).astype(np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB").save(tmp_path / "RGB.png")
    assert Image.open(tmp_path / "16-bit.png").mode.startswith("I")
    for kind in ("8-bit", "16-bit", "RGBA", "RGB"):
        data = preprocess(trained_cls_mmar, tmp_path / f"{kind}.png")
        assert data["image"].shape == (1, 32, 32), kind
        assert data["image"].dtype == torch.float32
        assert torch.equal(data["label"], torch.tensor([0.0, 1.0, 2.0]))
        inputs[kind] = data["image"].numpy()
    for kind in ("16-bit", "RGBA", "RGB"):
        np.testing.assert_allclose(inputs[kind], inputs["8-bit"], atol=2 / 255, err_msg=kind)


def test_colour_is_converted_with_luma_weights(trained_cls_mmar, tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (255, 0, 0)  # red: luma 0.299
    rgb[:, 16:] = (0, 0, 255)  # blue: luma 0.114
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "colour.png")
    image = preprocess(trained_cls_mmar, tmp_path / "colour.png")["image"][0].numpy()
    # PILReader returns (width, height): axis 0 is x. Red (left) is brighter than blue (right).
    assert image[:16].mean() == pytest.approx(1.0) and image[16:].mean() == pytest.approx(0.0)


# ---- bad inputs ----------------------------------------------------------------------------------------


def write_datalist(tmp_path, cls_data, change):
    data = json.loads(cls_data.read_text())
    for key in ("training", "validation"):
        data[key] = [{**item, "image": str(cls_data.parent / item["image"])} for item in data[key]]
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["training"][2].update(label=[0, 1]), r"label has 2 values, label_format \[1, 1, 3\] has 3"),
        (lambda d: d["training"][2].update(label=[0, 1, 3]), r"label\[2\] \(square_position\) is 3"),
        (lambda d: d["training"][2].update(label=[2, 1, 0]), r"label\[0\] \(disk\) is 2"),
    ],
)
def test_bad_labels_are_refused_naming_the_image(tmp_path, cls_data, trained_cls_mmar, change, message):
    bad = write_datalist(tmp_path, cls_data, change)
    image = json.loads(bad.read_text())["training"][2]["image"]
    # at init: the list and index are named
    result = run_mmar("init", str(tmp_path / "new"), "--task", "classification", "--datalist", str(bad), check=False)
    assert result.returncode == 1
    assert f"{bad}: training[2] ({image})" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    import re

    assert re.search(message, result.stderr), result.stderr
    # at train time (the MMAR was made for another datalist): the image is named, nothing is written
    models = sorted(p.name for p in (trained_cls_mmar / "models").iterdir())
    result = run_mmar("train", str(trained_cls_mmar), "--set", f"DATASET_JSON={bad}", "epochs=4", check=False)
    assert result.returncode == 1 and image in result.stderr and re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (trained_cls_mmar / "models").iterdir()) == models


def test_missing_and_corrupt_pngs_are_named(tmp_path, cls_data, trained_cls_mmar):
    missing = write_datalist(tmp_path, cls_data, lambda d: d["validation"][1].update(image=str(tmp_path / "gone.png")))
    result = run_mmar("validate", str(trained_cls_mmar), "--set", f"DATASET_JSON={missing}", check=False)
    assert result.returncode == 1 and "validation[1].image: file not found" in result.stderr
    assert "gone.png" in result.stderr

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    bad = write_datalist(tmp_path, cls_data, lambda d: d["validation"][1].update(image=str(corrupt)))
    before = (trained_cls_mmar / "eval" / "metrics.json").read_bytes() if (trained_cls_mmar / "eval" / "metrics.json").exists() else None
    result = run_mmar("validate", str(trained_cls_mmar), "--set", f"DATASET_JSON={bad}", check=False)
    assert result.returncode == 1
    first = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert first.startswith(f"error: cannot read image {corrupt}")
    after = (trained_cls_mmar / "eval" / "metrics.json").read_bytes() if (trained_cls_mmar / "eval" / "metrics.json").exists() else None
    assert before == after  # a failed run leaves earlier results alone


def test_datalist_without_label_format_is_refused_at_init(tmp_path, cls_data):
    bad = write_datalist(tmp_path, cls_data, lambda d: d.pop("label_format"))
    result = run_mmar("init", str(tmp_path / "new"), "--task", "classification", "--datalist", str(bad), check=False)
    assert result.returncode == 1 and "needs 'label_format'" in result.stderr


# ---- it learns ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_learns_the_synthetic_labels(tmp_path):
    from mmar.synthetic import write_classification_dataset

    datalist = write_classification_dataset(tmp_path / "data", cases=60, size=32, seed=5)
    # two layers a block: one is too few to find the thin bar in 12 epochs
    root = make_cls_mmar(tmp_path / "mmar", datalist, epochs=12,
                         extra=["network#growth_rate=16", "network#block_config=[2,2,2,2]"])
    run_mmar("train", str(root))
    run_mmar("validate", str(root))
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    seen = torch.load(root / "models" / "train_state.pt", weights_only=False)["progress"]["validations"]
    peak = int(np.argmax(seen["values"]))
    assert seen["values"][peak] > 0.8, seen  # it learns
    # model.ckpt is the selection rule's pick (within_noise): within one standard error of that peak on this
    # 15-image list (engine/selection.py), and `mmar validate` measures it as training did
    assert metrics["selection"]["rule"] == "within_noise"
    assert metrics["val_mean_auc"] == pytest.approx(metrics["selection"]["value"], abs=1e-3)
    assert metrics["val_mean_auc"] >= seen["values"][peak] - seen["noise"][peak] - 1e-3, (metrics, seen)
