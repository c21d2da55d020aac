"""Bad values for the keys the runtime reads: one `error:` line naming the key, the value and what is
expected, exit 1, nothing written; through the real CLI."""

from __future__ import annotations

import json

import pytest

from conftest import run_mmar
from mmar.archive import load_archive
from mmar.errors import MMARError

EPOCHS = "a whole number of epochs, 1 or more (e.g. epochs=10)"


def assert_one_error_line(result, expected: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [f"error: {expected}"]


@pytest.mark.parametrize("item, expected", [
    ("epochs=abc", f'epochs must be {EPOCHS}, got "abc"'),
    ("epochs=null", f"epochs must be {EPOCHS}, got null"),
    ("epochs=[1]", f"epochs must be {EPOCHS}, got [1]"),
    # int() made this 2 epochs while the cosine schedule's T_max (@epochs) got 2.5
    ("epochs=2.5", f"epochs must be {EPOCHS}, got 2.5"),
    ("epochs=0", f"epochs must be {EPOCHS}, got 0"),
    # a string, which bool() took for true
    ("amp=False", 'amp must be true or false, got "False"'),
    ("learning_rate=-1e-3", "learning_rate must be a number > 0 (e.g. learning_rate=1e-4), got -0.001"),
    ("train#batch_size=0", "train#batch_size must be a whole number of cases, 1 or more, got 0"),
    ("determinism#random_seed=1.5", "determinism#random_seed must be a whole number >= 0, or null for a random seed, "
                                    "got 1.5"),
    # the engine read `false` as "cache everything"
    ("validate#cache=false", 'validate#cache must be an object (e.g. {"rate": 0} to cache nothing), got false'),
    ("train#cache#rate=2", "train#cache#rate must be the share of the cases to cache, from 0 (none) to 1 (all), got 2"),
    ('validate#cache={"rat": 0}', "unknown config key 'validate#cache#rat' (did you mean 'validate#cache#rate'?)"),
])
def test_a_bad_set_value_is_one_line_naming_key_and_value(seg_mmar, item, expected):
    result = run_mmar("train", str(seg_mmar), "--set", item, check=False)
    assert_one_error_line(result, f"--set {item}: {expected}")
    # nothing trained or written (a hidden lock file may be there)
    assert not [path for path in (seg_mmar / "models").iterdir() if not path.name.startswith(".")]


def test_a_bad_value_in_the_config_file_names_the_file(seg_mmar):
    path = seg_mmar / "config" / "config_train.json"
    config = json.loads(path.read_text())
    config["epochs"] = "300"
    path.write_text(json.dumps(config))
    result = run_mmar("validate", str(seg_mmar), check=False)
    assert_one_error_line(result, f'{path}: epochs must be {EPOCHS}, got "300"')


def test_good_values_still_load(seg_mmar, monkeypatch):
    monkeypatch.setenv("MMAR_ALLOW_EXPRESSIONS", "1")  # a `$` expression in --set (docs/security.md)
    archive = load_archive(seg_mmar, ["epochs=3", "amp=false", "learning_rate=$2e-3 / 2",
                                      "determinism#random_seed=null", 'validate#cache={"rate": 0.5, "num_workers": 2}'])
    assert archive.config["epochs"] == 3 and archive.config["amp"] is False
    assert archive.config["validate"]["cache"] == {"rate": 0.5, "num_workers": 2}
    with pytest.raises(MMARError, match="epochs must be"):
        load_archive(seg_mmar, ["epochs=true"])  # JSON true is a bool, not the number 1


@pytest.mark.parametrize("value", ["-3", "0", "2.5", "abc"])
def test_init_refuses_a_bad_epoch_count(tmp_path, seg_data, value):
    root = tmp_path / "mmar"
    result = run_mmar("init", str(root), "--datalist", str(seg_data), "--epochs", value, check=False)
    assert_one_error_line(result, f"mmar init --epochs {value}: expected a whole number of epochs, 1 or more "
                                  "(e.g. --epochs 100)")
    assert not root.exists()


def test_init_function_refuses_a_bad_epoch_count(tmp_path, seg_data):
    from mmar.scaffold import init

    with pytest.raises(MMARError, match=r"epochs must be a whole number of epochs, 1 or more .*got -3"):
        init(tmp_path / "mmar", task="segmentation", datalist=seg_data, epochs=-3)
    assert not (tmp_path / "mmar").exists()


@pytest.mark.parametrize("cache, cached", [(None, True), ('validate#cache={"rate": 0}', False)])
def test_validate_cache_reaches_the_dataset_of_mmar_validate(seg_mmar, cache, cached):
    from monai.data import CacheDataset

    from mmar.engine.workflow import build_dataset, keys_of, section_items

    archive = load_archive(seg_mmar, [cache] if cache else [], for_validation=True)
    dataset = build_dataset(archive.parser(), "validate", section_items(archive, "validate"),
                            keys=list(keys_of(archive.config)), with_augmentation=False, log=lambda *_: None)
    assert isinstance(dataset, CacheDataset) is cached


@pytest.mark.slow
def test_validate_cache_is_settable_and_used(seg_mmar):
    """validate#cache#rate=0: training's per-epoch validation reads its cases each time instead of caching them
    (about 15 s, 30 s on a busy machine)."""
    result = run_mmar("train", str(seg_mmar), "--set", "epochs=1", 'validate#cache={"rate": 0}',
                      env={"CUDA_VISIBLE_DEVICES": "", "MMAR_CPU_AMP": "0"})
    assert "training cases preprocessed" in result.stdout  # the cache's log line, still there for training
    assert "validation cases preprocessed" not in result.stdout
    assert "val_mean_dice" in result.stdout
