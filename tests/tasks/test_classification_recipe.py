"""The classification recipe `mmar init` writes (issue 23): DenseNet121, a fixed step budget, mixup, the
moving average of the weights; the categorical (softmax) path gets the same defaults."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL_CLASSIFICATION, run_mmar
from mmar.tasks import classification


def build(network_config, label_outputs):
    from monai.bundle import ConfigParser

    parser = ConfigParser({"label_format": [1] * label_outputs, "network": network_config})
    return parser.get_parsed_content("network")


@pytest.mark.parametrize("size", [32, 64, 256])
def test_the_network_takes_every_image_size_init_can_choose(size):
    network = build(classification.network(), label_outputs=5)  # e.g. label_format [1, 1, 3]
    network.eval()
    with torch.no_grad():
        assert network(torch.zeros(2, 1, size, size)).shape == (2, 5)


def test_epochs_follow_a_fixed_step_budget():
    assert classification.default_epochs(546) == 33  # BreastMNIST: 18 steps of 32 an epoch
    assert classification.default_epochs(600) == 32  # the NIH sample
    assert classification.default_epochs(100_000) == 10  # a large list: at least 10 epochs
    assert classification.default_epochs(10) == 200  # a tiny one: capped
    train, _ = classification.default_configs(label_format=[1], label_names=["x"], spatial_size=[32, 32],
                                              num_training=546)
    assert train["epochs"] == 33 and train["train"]["batch_size"] == 32
    train, _ = classification.default_configs(label_format=[1], label_names=["x"], spatial_size=[32, 32], epochs=4,
                                              num_training=546)
    assert train["epochs"] == 4  # `mmar init --epochs` wins


def write_categorical(out, cases=24, size=32, classes=3):
    """One 3-class label: a bright square in the left, middle or right third of the image."""
    rng = np.random.default_rng(0)
    (out / "png").mkdir(parents=True)
    items = []
    for index in range(cases):
        label = index % classes
        image = rng.integers(0, 40, (size, size)).astype(np.uint8)
        left = label * size // classes
        image[size // 3: 2 * size // 3, left + 2: left + size // classes - 2] = 220
        Image.fromarray(image).save(out / "png" / f"c{index:03d}.png")
        items.append({"image": f"png/c{index:03d}.png", "label": [label]})
    datalist = {"label_format": [classes], "label_names": ["position"], "training": items[6:], "validation": items[:6]}
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist))
    return path


def test_categorical_labels_get_the_same_defaults_and_softmax(tmp_path):
    datalist = write_categorical(tmp_path / "data")
    root = tmp_path / "mmar"
    run_mmar("init", str(root), "--task", "classification", "--datalist", str(datalist))
    config = json.loads((root / "config" / "config_train.json").read_text())
    binary, _ = classification.default_configs(label_format=[1], label_names=["x"], spatial_size=[32, 32],
                                               num_training=18)
    for key in ("network", "epochs", "learning_rate"):
        assert config[key] == binary[key], key
    for key in ("ema", "mixup", "optimizer", "lr_scheduler", "augmentation", "batch_size"):
        assert config["train"][key] == binary["train"][key], key
    run_mmar("train", str(root), "--set", "epochs=2", *SMALL_CLASSIFICATION)
    run_mmar("validate", str(root), "--set", *SMALL_CLASSIFICATION)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(metrics["auc_per_label"]) == {"position"} and 0.0 <= metrics["val_mean_auc"] <= 1.0
    run_mmar("infer", str(root), "--set", *SMALL_CLASSIFICATION)
    with open(root / "eval" / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == ["position=0", "position=1", "position=2"]
    for row in rows[1:]:
        assert sum(float(v) for v in row[1:]) == pytest.approx(1.0, abs=1e-4)  # softmax over the segment


def test_init_picks_the_median_size_rounded_up_to_32_at_least_32_at_most_256():
    """28 px MedMNIST images go to the network at 32 px (a 64 px grid was measured, issue 35: no gain beyond
    the noise for twice the training time, docs/classification.md)."""
    assert classification.spatial_size_for([(28, 28)] * 5) == [32, 32]
    assert classification.spatial_size_for([(64, 64), (64, 64), (80, 60)]) == [64, 64]
    assert classification.spatial_size_for([(100, 70)] * 3) == [128, 96]
    assert classification.spatial_size_for([(1024, 1024)]) == [256, 256]
