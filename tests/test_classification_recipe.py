"""The classification recipe `mmar init` writes (issue 23): a ResNet-18 sized to the image, a fixed step
budget, the moving average of the weights; the categorical (softmax) path gets the same defaults."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_mmar
from mmar.tasks import classification

SMALL_RESNET = ["network#block_inplanes=[8,16,32,64]", "network#layers=[1,1,1,1]", "train#batch_size=8"]


def build(network_config, label_outputs):
    from monai.bundle import ConfigParser

    parser = ConfigParser({"label_format": [1] * label_outputs, "network": network_config})
    return parser.get_parsed_content("network")


def last_stage_size(network, size):
    shapes = []
    network.layer4.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape[-2:])))
    network.eval()
    with torch.no_grad():
        network(torch.zeros(1, 1, size, size))
    return shapes[0]


@pytest.mark.parametrize("size, stem, last", [(32, (3, 1), (2, 2)), (64, (7, 2), (2, 2)), (256, (7, 2), (8, 8))])
def test_the_stem_is_sized_to_the_image(size, stem, last):
    config = classification.network_for([size, size])
    assert (config["conv1_t_size"], config["conv1_t_stride"]) == stem
    network = build({**config, "block_inplanes": [8, 16, 32, 64]}, label_outputs=3)
    assert last_stage_size(network, size) == last  # never DenseNet121's 1x1 maps at 32 px


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
    for key in ("ema", "optimizer", "lr_scheduler", "augmentation", "batch_size"):
        assert config["train"][key] == binary["train"][key], key
    run_mmar("train", str(root), "--set", "epochs=2", *SMALL_RESNET)
    run_mmar("validate", str(root), "--set", *SMALL_RESNET)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(metrics["auc_per_label"]) == {"position"} and 0.0 <= metrics["val_mean_auc"] <= 1.0
    run_mmar("infer", str(root), "--set", *SMALL_RESNET)
    with open(root / "eval" / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == ["position=0", "position=1", "position=2"]
    for row in rows[1:]:
        assert sum(float(v) for v in row[1:]) == pytest.approx(1.0, abs=1e-4)  # softmax over the segment
