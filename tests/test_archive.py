import json

import pytest

from mmar.archive import load_archive, num_training_epoch_per_valid
from mmar.errors import MMARError


def test_set_overrides_config_and_environment_keys(seg_mmar, tmp_path):
    archive = load_archive(seg_mmar, ["epochs=7", "train#batch_size=3", "determinism.random_seed=5",
                                      "DATASET_JSON=other.json", "learning_rate=1e-4", "validate#inferer#mode=constant"])
    assert archive.config["epochs"] == 7
    assert archive.config["train"]["batch_size"] == 3
    assert archive.config["determinism"]["random_seed"] == 5
    assert archive.config["learning_rate"] == 1e-4
    assert archive.config["validate"]["inferer"]["mode"] == "constant"
    assert archive.env["DATASET_JSON"] == str(seg_mmar / "other.json")  # relative to the MMAR root


def test_environment_paths_and_defaults(seg_mmar):
    archive = load_archive(seg_mmar)
    assert archive.models_dir == seg_mmar / "models"
    assert archive.eval_dir == seg_mmar / "eval"
    assert archive.task == "segmentation"


@pytest.mark.parametrize("override, message", [
    ("epoch=3", "unknown config key 'epoch' \\(did you mean 'epochs'\\?\\)"),
    ("train#batchsize=3", "unknown config key 'train#batchsize' \\(did you mean 'train#batch_size'\\?\\)"),
    ("epochs", "expected KEY=VALUE"),
    # keys nothing reads are unknown too: `compile`, `log_every` and `deterministic` used to be accepted
    # and silently did nothing (no torch.compile, no deterministic algorithms)
    ("train#compile=true", "unknown config key 'train#compile'"),
    ("train#log_every=10", "unknown config key 'train#log_every'"),
    ("determinism#deterministic=true", "unknown config key 'determinism#deterministic'"),
])
def test_unknown_keys_are_errors(seg_mmar, override, message):
    with pytest.raises(MMARError, match=message):
        load_archive(seg_mmar, [override])


def test_unknown_key_in_config_file_names_the_file(seg_mmar):
    path = seg_mmar / "config" / "config_train.json"
    config = json.loads(path.read_text())
    config["num_epochs"] = 3
    path.write_text(json.dumps(config))
    with pytest.raises(MMARError, match="config_train.json: unknown config key 'num_epochs'"):
        load_archive(seg_mmar)


def test_bad_json_names_the_file_and_line(seg_mmar):
    (seg_mmar / "config" / "environment.json").write_text('{"DATA_ROOT": "x",\n oops}')
    with pytest.raises(MMARError, match="environment.json: invalid JSON at line 2"):
        load_archive(seg_mmar)


def test_validation_config_is_laid_over_training(seg_mmar):
    path = seg_mmar / "config" / "config_validation.json"
    validation = json.loads(path.read_text())
    validation["validate"]["overlays"] = 0
    path.write_text(json.dumps(validation))
    assert load_archive(seg_mmar).config["validate"]["overlays"] == 3
    assert load_archive(seg_mmar, for_validation=True).config["validate"]["overlays"] == 0


def test_clara_v4_interval_key():
    assert num_training_epoch_per_valid({"num_interval_per_valid": 3}) == 3
    assert num_training_epoch_per_valid({"num_training_epoch_per_valid": 2}) == 2
    with pytest.raises(MMARError):
        num_training_epoch_per_valid({"num_training_epoch_per_valid": 0})
