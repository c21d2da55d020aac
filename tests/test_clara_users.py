"""What a former Clara Train user runs into (issue 36), through the real CLI: `mmar init` on a PNG datalist
without --task, on a datalist relative to another data root, on a Clara MMAR; a Clara config refused once, as
one; `--set` keys named whole with the closest known key; fine-tuning without a model refused before any work;
`--set` values that would run code refused (docs/security.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_mmar
from mmar.archive import load_archive

# A Clara Train v4 MMAR (clara_pt_spleen_ct_segmentation, shortened): {name, args} components, v4's keys
CLARA_V4_CONFIG = {
    "epochs": 1260,
    "num_interval_per_valid": 20,
    "learning_rate": 1e-4,
    "multi_gpu": False,
    "amp": True,
    "determinism": {"random_seed": 0},
    "cudnn_benchmark": False,
    "dont_load_ckpt_model": True,
    "train": {
        "loss": {"name": "DiceLoss", "args": {"to_onehot_y": True, "softmax": True}},
        "optimizer": {"name": "Adam", "args": {"lr": "{learning_rate}"}},
        "model": {"name": "UNet", "args": {"dimensions": 3, "in_channels": 1, "out_channels": 2,
                                           "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2]}},
        "pre_transforms": [{"name": "LoadImaged", "args": {"keys": ["image", "label"]}},
                           {"name": "EnsureChannelFirstd", "args": {"keys": ["image", "label"]}}],
        "dataset": {"name": "CacheDataset", "data_list_file_path": "{DATASET_JSON}",
                    "data_file_base_dir": "{DATA_ROOT}", "data_list_key": "training", "args": {"cache_rate": 1.0}},
        "dataloader": {"name": "DataLoader", "args": {"batch_size": 2, "shuffle": True, "num_workers": 4}},
        "inferer": {"name": "SimpleInferer"},
        "handlers": [{"name": "CheckpointLoader", "disabled": "{dont_load_ckpt_model}", "args": {"load_path": "{MMAR_CKPT}"}}],
        "trainer": {"name": "SupervisedTrainer", "args": {"max_epochs": "{epochs}"}},
    },
    "validate": {
        "pre_transforms": [{"name": "LoadImaged", "args": {"keys": ["image", "label"]}}],
        "inferer": {"name": "SlidingWindowInferer", "args": {"roi_size": [160, 160, 160], "sw_batch_size": 4}},
        "metrics": [{"name": "MeanDice", "log_label": "val_mean_dice", "is_key_metric": True, "args": {}}],
        "evaluator": {"name": "SupervisedEvaluator"},
    },
}


def clara_v4_mmar(root: Path, datalist: Path, data_root: Path) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "config" / "config_train.json").write_text(json.dumps(CLARA_V4_CONFIG, indent=2))
    (root / "config" / "environment.json").write_text(json.dumps({
        "DATA_ROOT": str(data_root), "DATASET_JSON": str(datalist), "PROCESSING_TASK": "segmentation",
        "MMAR_EVAL_OUTPUT_PATH": "eval", "MMAR_CKPT_DIR": "models", "MMAR_CKPT": "models/model.pt",
        "MMAR_TORCHSCRIPT": "models/model.ts"}, indent=2))
    return root


def one_error_line(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


# ---- item 1: init without --task on a PNG (classification) datalist


def test_init_without_task_tells_classification_from_the_datalist(tmp_path):
    run_mmar("demo-data", str(tmp_path / "X"), "--task", "classification", "--cases", "6", "--size", "24")
    result = run_mmar("init", str(tmp_path / "Y"), "--datalist", str(tmp_path / "X" / "datalist.json"))
    assert "task: classification (the datalist declares label_format" in result.stdout
    environment = json.loads((tmp_path / "Y" / "config" / "environment.json").read_text())
    assert environment["PROCESSING_TASK"] == "classification"
    assert load_archive(tmp_path / "Y").task == "classification"


def test_init_without_task_tells_png_images_without_label_format(tmp_path):
    """No label_format: the PNG images say classification, whose reading then asks for label_format."""
    run_mmar("demo-data", str(tmp_path / "X"), "--task", "classification", "--cases", "6", "--size", "24")
    datalist = tmp_path / "X" / "datalist.json"
    data = json.loads(datalist.read_text())
    del data["label_format"], data["label_names"]
    datalist.write_text(json.dumps(data))
    line = one_error_line(run_mmar("init", str(tmp_path / "Y"), "--datalist", str(datalist), check=False))
    assert "a classification datalist needs 'label_format'" in line
    assert not (tmp_path / "Y" / "config" / "config_train.json").exists()


def test_init_with_the_wrong_task_names_the_right_one(tmp_path):
    run_mmar("demo-data", str(tmp_path / "X"), "--task", "classification", "--cases", "6", "--size", "24")
    datalist = tmp_path / "X" / "datalist.json"
    line = one_error_line(run_mmar("init", str(tmp_path / "Y"), "--task", "segmentation", "--datalist", str(datalist),
                                   check=False))
    assert line.startswith(f"error: {datalist}: training[0].image ") and "use --task classification" in line


def test_init_without_task_on_nifti_is_segmentation(tmp_path, seg_data):
    result = run_mmar("init", str(tmp_path / "Y"), "--datalist", str(seg_data), "--epochs", "1")
    assert "task: segmentation (training[0].image is " in result.stdout
    assert load_archive(tmp_path / "Y").task == "segmentation"


@pytest.mark.parametrize("item, task", [
    ({"image": "a.mha", "label": "a_seg.mha"}, "segmentation"),
    ({"image": ["t1/a.nii.gz", "t2/a.nii.gz"], "label": "a.nii.gz"}, "segmentation"),
    ({"image": "a.PNG", "label": "1"}, "classification"),
    ({"image": "a.tiff", "label": [0, 1]}, "classification"),  # a number label, whatever the image
])
def test_the_task_a_datalist_tells(tmp_path, item, task):
    from mmar.scaffold import infer_task

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [item]}))
    assert infer_task(datalist)[0] == task


def test_a_datalist_that_tells_no_task_is_one_line_naming_both(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.dat", "label": "a.lbl"}]}))
    line = one_error_line(run_mmar("init", str(tmp_path / "Y"), "--datalist", str(datalist), check=False))
    assert line.startswith(f"error: {datalist}: cannot tell the task from training[0]")
    assert "--task segmentation" in line and "--task classification" in line


# ---- item 3: a datalist whose paths are relative to another data root


@pytest.mark.parametrize("option", ["--file_root", "--data-root"])
def test_init_reads_a_datalist_relative_to_another_root(tmp_path, seg_data, option):
    lists = tmp_path / "lists"
    lists.mkdir()
    datalist = lists / "dataset_0.json"
    shutil.copy(seg_data, datalist)  # its paths are relative to seg_data's folder, not to lists/
    without = run_mmar("init", str(tmp_path / "A"), "--datalist", str(datalist), check=False)
    line = one_error_line(without)
    assert "training[0].image: file not found" in line and "--file_root DIR" in line
    run_mmar("init", str(tmp_path / "B"), "--datalist", str(datalist), option, str(seg_data.parent), "--epochs", "1")
    archive = load_archive(tmp_path / "B")
    assert archive.env["DATA_ROOT"] == str(seg_data.parent)
    # what train reads: the same base folder
    from mmar.engine.workflow import section_items

    items = section_items(archive, "train")
    assert items and all(Path(item["image"]).is_file() for item in items)


def test_init_refuses_a_data_root_that_is_no_folder(tmp_path, seg_data):
    line = one_error_line(run_mmar("init", str(tmp_path / "B"), "--datalist", str(seg_data), "--file_root",
                                   str(tmp_path / "nowhere"), check=False))
    assert "the data root (--file_root)" in line and str(tmp_path / "nowhere") in line


# ---- item 4: a Clara config is said to be one, once; init --from-clara carries what maps one to one


@pytest.mark.parametrize("command", ["train", "validate"])
def test_a_clara_config_is_refused_once_as_a_clara_config(tmp_path, seg_data, command):
    clara = clara_v4_mmar(tmp_path / "clara", seg_data, seg_data.parent)
    line = one_error_line(run_mmar(command, str(clara), check=False))
    assert line.startswith(f"error: {clara / 'config' / 'config_train.json'}: this is a Clara Train v4 config (")
    assert "train#model {name: UNet, args}" in line or "dont_load_ckpt_model" in line
    assert "docs/clara-migration.md" in line and f"mmar init NEW_DIR --from-clara {clara}" in line


def test_a_clara_v3_config_is_refused_as_one(tmp_path, seg_mmar):
    path = seg_mmar / "config" / "config_train.json"
    config = json.loads(path.read_text())
    config["dynamic_input_shape"] = True
    config["train"]["image_pipeline"] = {"name": "SegmentationImagePipelineWithCache", "args": {"batch_size": 2}}
    path.write_text(json.dumps(config))
    line = one_error_line(run_mmar("train", str(seg_mmar), check=False))
    assert "this is a Clara Train v3 config (dynamic_input_shape, train#image_pipeline" in line


def test_init_from_clara_carries_the_keys_that_map_one_to_one(tmp_path, seg_data):
    clara = clara_v4_mmar(tmp_path / "clara", seg_data, seg_data.parent)
    result = run_mmar("init", str(tmp_path / "new"), "--from-clara", str(clara))
    assert "from Clara MMAR" in result.stdout and "not carried" in result.stdout and "train#model (UNet)" in result.stdout
    archive = load_archive(tmp_path / "new")
    config = archive.config
    assert (config["epochs"], config["learning_rate"], config["num_training_epoch_per_valid"], config["amp"]) == \
        (1260, 1e-4, 20, True)
    assert config["determinism"]["random_seed"] == 0 and config["train"]["batch_size"] == 2
    assert archive.env["DATASET_JSON"] == str(seg_data) and archive.env["DATA_ROOT"] == str(seg_data.parent)
    assert archive.task == "segmentation"


def test_clara_v4_mmar_ckpt_is_read_as_mmar_ckpt_dir(tmp_path, seg_mmar):
    path = seg_mmar / "config" / "environment.json"
    environment = json.loads(path.read_text())
    del environment["MMAR_CKPT_DIR"]
    environment["MMAR_CKPT"] = "weights/model.pt"
    path.write_text(json.dumps(environment))
    assert load_archive(seg_mmar).models_dir == seg_mmar / "weights"
    result = run_mmar("validate", str(seg_mmar), check=False)  # read as an MMAR: the missing model is the error
    assert "unknown key" not in result.stderr and "MMAR_CKPT" not in result.stderr
    environment["MMAR_TORCHSCRIPT"] = "weights/model.ts"
    path.write_text(json.dumps(environment))
    line = one_error_line(run_mmar("validate", str(seg_mmar), check=False))
    assert "MMAR_TORCHSCRIPT is Clara v4's key" in line and "docs/clara-migration.md" in line


# ---- item 7: an unknown --set key, quoted whole, with the closest known key


@pytest.mark.parametrize("item, expected", [
    ("train#batchsize=4", "unknown config key 'train#batchsize' (did you mean 'train#batch_size'?)"),
    ("train#key_metric=x", "unknown config key 'train#key_metric' (did you mean 'validate#key_metric'?)"),
    ("batch_size=4", "unknown config key 'batch_size' (did you mean 'train#batch_size'?)"),
])
def test_an_unknown_set_key_is_quoted_whole_with_the_closest_key(seg_mmar, item, expected):
    line = one_error_line(run_mmar("train", str(seg_mmar), "--set", item, check=False))
    assert line == f"error: --set {item}: {expected}"


# ---- issue 31: --set values are data, not code


@pytest.mark.parametrize("item, found", [
    ("learning_rate=$__import__('os').system('touch PWNED') or 1e-3", "is a Python expression"),
    ('train#loss={"_target_": "subprocess.run", "args": ["touch", "PWNED"]}', "`_target_` makes a component"),
    ("validate#inferer#extra#_target_=subprocess.run", "`_target_` makes a component"),
    ("train#loss#reduction=%/data/evil.json#x", "is a macro"),
])
def test_set_refuses_code_unless_allowed(seg_mmar, tmp_path, item, found):
    line = one_error_line(run_mmar("train", str(seg_mmar), "--set", item, check=False))
    assert line.startswith(f"error: --set {item}: ") and found in line
    assert "MMAR_ALLOW_EXPRESSIONS=1" in line and "docs/security.md" in line
    assert not (Path.cwd() / "PWNED").exists()


def test_set_expressions_with_the_opt_in(seg_mmar, monkeypatch):
    monkeypatch.setenv("MMAR_ALLOW_EXPRESSIONS", "1")
    assert load_archive(seg_mmar, ["learning_rate=$2e-3 / 2"]).config["learning_rate"] == "$2e-3 / 2"
    monkeypatch.delenv("MMAR_ALLOW_EXPRESSIONS")
    # references, and `$` in environment paths (expanded as variables, never evaluated), stay allowed
    archive = load_archive(seg_mmar, ["learning_rate=@epochs", "DATA_ROOT=$HOME/data"])
    assert archive.config["learning_rate"] == "@epochs"


# ---- item 5: fine-tuning without a model is refused before any work


def test_finetune_start_names_the_checkpoint_and_how_to_give_one(seg_mmar, tmp_path):
    from mmar.archive import finetune_start
    from mmar.errors import MMARError

    archive = load_archive(seg_mmar)
    with pytest.raises(MMARError) as error:
        finetune_start(archive)
    message = str(error.value)
    assert str(seg_mmar / "models" / "model.ckpt") in message
    assert "PRETRAIN_WEIGHTS_FILE" in message and "--ckpt PATH" in message
    with pytest.raises(MMARError, match="PRETRAIN_WEIGHTS_FILE"):
        finetune_start(load_archive(seg_mmar, [f"PRETRAIN_WEIGHTS_FILE={tmp_path / 'gone.ckpt'}"]))
    with pytest.raises(MMARError, match="--ckpt"):
        finetune_start(archive, str(tmp_path / "gone.ckpt"))
    weights = tmp_path / "weights.ckpt"
    weights.write_bytes(b"x")
    assert finetune_start(load_archive(seg_mmar, [f"PRETRAIN_WEIGHTS_FILE={weights}"])) == weights
    assert finetune_start(archive, str(weights)) == weights
    (seg_mmar / "models" / "train_state.pt").write_bytes(b"x")  # a run there: the engine decides
    assert finetune_start(archive) is None


def test_finetune_without_a_model_fails_before_any_work(seg_mmar):
    result = run_mmar("train", str(seg_mmar), "--finetune", check=False)
    line = one_error_line(result)
    assert "PRETRAIN_WEIGHTS_FILE" in line and "--ckpt" in line
    assert "preprocessed" not in result.stdout  # no data read
    assert not [path for path in (seg_mmar / "models").iterdir() if not path.name.startswith(".")]


# ---- item 6: a plain training after a finished fine-tuning says what was asked


def test_training_after_a_finished_finetuning_says_what_was_asked(seg_mmar):
    cpu = {"CUDA_VISIBLE_DEVICES": "", "MMAR_CPU_AMP": "0"}
    run_mmar("train", str(seg_mmar), "--set", "epochs=1", env=cpu)
    run_mmar("train", str(seg_mmar), "--finetune", "--set", "epochs=1", env=cpu)
    result = run_mmar("train", str(seg_mmar), "--set", "epochs=1", env=cpu)
    assert "asked for a training" in result.stdout and "finished fine-tuning" in result.stdout
    assert "--restart" in result.stdout
