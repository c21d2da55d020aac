"""Training papercuts (real CLI): a last batch of one image, one TensorBoard folder per run, what the end
of a run without validation says, and one clean line for a data error with caching off."""

from __future__ import annotations

import json

import pytest

from conftest import SMALL_CLASSIFICATION, run_mmar


@pytest.mark.slow
def test_classification_trains_when_a_batch_of_one_would_remain(tmp_path):
    from mmar.archive import load_archive
    from mmar.scaffold import init
    from mmar.synthetic import write_classification_dataset

    datalist = write_classification_dataset(tmp_path / "data", cases=24, size=32, seed=3)
    data = json.loads(datalist.read_text())
    del data["validation"]  # and no validation list: the end of the run says what model.ckpt is
    datalist.write_text(json.dumps(data))
    cases = len(data["training"])
    root = tmp_path / "mmar"
    init(root, task="classification", datalist=datalist, epochs=2, log=lambda *_: None)
    config = load_archive(root, SMALL_CLASSIFICATION).config
    config["train"]["batch_size"] = cases - 1  # DenseNet's batch norm cannot train on the last batch, of one
    (root / "config" / "config_train.json").write_text(json.dumps(config, indent=2))

    result = run_mmar("train", str(root))
    assert f"{cases} cases in batches of {cases - 1} would end each epoch with a batch of 1" in result.stdout, \
        result.stdout
    assert "no validation: model.ckpt is the model of epoch 2" in result.stdout
    assert "None" not in result.stdout.splitlines()[-1]

    # a fine-tuning run after the training: TensorBoard shows both, each in its own folder
    run_mmar("train", str(root), "--finetune", "--set", "epochs=1")
    runs = sorted(p.name.split("-")[0] for p in (root / "models" / "runs").iterdir())
    assert runs == ["finetune", "train"]
    (kept,) = (root / "models" / "previous").iterdir()  # the trained models, kept beside the fine-tuned ones
    assert sorted(p.name for p in kept.iterdir()) == ["model.ckpt", "model_final.ckpt", "train_state.pt",
                                                     "training_curves.png"]


def test_a_data_error_with_caching_off_is_one_line(seg_mmar, seg_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(seg_data.parent, data)
    listing = json.loads((data / seg_data.name).read_text())
    broken = data / listing["training"][1]["image"]
    broken.write_bytes(broken.read_bytes()[:200])
    result = run_mmar("train", str(seg_mmar), "--set", f"DATASET_JSON={data / seg_data.name}", "train#cache#rate=0",
                      'train#num_workers=2', check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot read image {broken}: Cannot work out file type of \"{broken}\""], result.stderr


def test_a_data_error_in_validate_and_infer_with_caching_off_is_one_line(trained_seg_mmar, seg_data, tmp_path):
    import shutil

    mmar = tmp_path / "mmar"
    shutil.copytree(trained_seg_mmar, mmar)  # the session's trained MMAR is shared: work on a copy
    data = tmp_path / "data"
    shutil.copytree(seg_data.parent, data)
    listing = json.loads((data / seg_data.name).read_text())
    broken = data / listing["validation"][0]["image"]
    broken.write_bytes(broken.read_bytes()[:200])
    for command in ("validate", "infer"):
        result = run_mmar(command, str(mmar), "--set", f"DATASET_JSON={data / seg_data.name}", 'validate#cache={"rate":0}',
                          check=False)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert result.stderr.strip().splitlines() == [
            f"error: cannot read image {broken}: Cannot work out file type of \"{broken}\""], (command, result.stderr)
