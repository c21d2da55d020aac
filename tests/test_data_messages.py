"""Data-reading messages of a classification MMAR, through the real CLI: a quoted number label is that
number, a text file named .png is said not to be an image, a missing list names only the lists of items."""

import json
import shutil

import pytest
import torch

from conftest import SMALL_CLASSIFICATION, run_mmar


@pytest.fixture(scope="module")
def cls_png(tmp_path_factory):
    """12 tiny PNGs with their [1, 1, 3] labels (mmar.synthetic), and the folder they are in."""
    from mmar.synthetic import write_classification_dataset

    datalist = write_classification_dataset(tmp_path_factory.mktemp("clspng"), cases=12, size=32, seed=5)
    return datalist.parent, json.loads(datalist.read_text())


def _write(folder, data, name="datalist.json"):
    path = folder / name
    path.write_text(json.dumps(data, indent=2))
    return path


def _mmar(root, datalist):
    from mmar.archive import load_archive
    from mmar.scaffold import init

    init(root, task="classification", datalist=datalist, epochs=1, log=lambda *_: None)
    archive = load_archive(root, SMALL_CLASSIFICATION)
    (root / "config" / "config_train.json").write_text(json.dumps(archive.config, indent=2))
    return root


def _fails(*args, match):
    result = run_mmar(*args, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for pattern in match:
        assert pattern in result.stderr, (pattern, result.stderr)
    return result


@pytest.mark.slow
def test_quoted_number_labels_are_read_as_numbers_in_training(cls_png, tmp_path):
    """Clara's datalists often quote a label: "label": "2" is the class 2, not a file named 2."""
    folder, data = cls_png
    quoted = {"label_format": [3], "label_names": ["square_position"]}
    for key in ("training", "validation"):  # the 3-class label of each case, as a quoted number
        quoted[key] = [{"image": item["image"], "label": str(item["label"][2])} for item in data[key]]
    datalist = _write(folder, quoted, "quoted.json")
    root = _mmar(tmp_path / "mmar", datalist)
    run_mmar("train", str(root))  # validates after its epoch: both lists are read and their labels checked
    state = torch.load(root / "models" / "train_state.pt", weights_only=False)
    [record] = state["progress"]["history"]
    assert "auc/square_position" in record and 0.0 <= record["val_mean_auc"] <= 1.0


def test_a_text_file_named_png_is_not_a_readable_image(cls_png, tmp_path):
    folder, data = cls_png
    root = _mmar(tmp_path / "mmar", folder / "datalist.json")
    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    (copy / "png" / "notes.png").write_text("exported with the wrong extension\n")
    broken = json.loads(json.dumps(data))
    broken["training"][0]["image"] = "png/notes.png"
    datalist = _write(copy, broken)
    result = _fails("train", str(root), "--set", f"DATASET_JSON={datalist}",
                    match=[f"cannot read image {copy / 'png' / 'notes.png'}: not a readable image"])
    assert "dcmread" not in result.stderr and "converter" not in result.stderr
    assert not (root / "models" / "model.ckpt").exists()


def test_a_missing_list_names_only_the_lists_of_items(cls_png, tmp_path):
    folder, data = cls_png
    root = _mmar(tmp_path / "mmar", folder / "datalist.json")
    no_training = {key: value for key, value in data.items() if key != "training"}
    datalist = _write(folder, no_training, "no_training.json")
    result = _fails("train", str(root), "--set", f"DATASET_JSON={datalist}",
                    match=["no_training.json: no list 'training' (lists present: validation)"])
    assert "label_format" not in result.stderr.split("lists present")[1]
