"""Bad input: a clear error naming the case and file, a non-zero exit, nothing already written lost."""

import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import run_mmar


@pytest.fixture
def mmar_copy(trained_seg_mmar, tmp_path):
    root = tmp_path / "mmar"
    shutil.copytree(trained_seg_mmar, root)
    return root


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _protected(root):
    files = [root / "models" / "model.ckpt", root / "models" / "model_final.ckpt", root / "eval" / "metrics.json"]
    run_mmar("validate", str(root))
    return {f: _digest(f) for f in files}


def _datalist_with(root, tmp_path, mutate):
    """A copy of the MMAR's data with one case changed by `mutate(image_path, label_path)`."""
    source = json.loads((root / "config" / "environment.json").read_text())["DATASET_JSON"]
    data_dir = tmp_path / "data"
    shutil.copytree(source.rsplit("/", 1)[0], data_dir)
    datalist = json.loads((data_dir / "datalist.json").read_text())
    case = datalist["validation"][0]
    mutate(data_dir / case["image"], data_dir / case["label"])
    return data_dir / "datalist.json", case


def _assert_fails(root, protected, *args, match):
    result = run_mmar(*args, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for pattern in match:
        assert pattern in result.stderr, (pattern, result.stderr)
    for path, digest in protected.items():
        assert _digest(path) == digest, f"{path} was changed by a failed run"


def test_truncated_nifti(mmar_copy, tmp_path):
    protected = _protected(mmar_copy)

    def truncate(image, label):
        image.write_bytes(image.read_bytes()[:200])

    datalist, case = _datalist_with(mmar_copy, tmp_path, truncate)
    _assert_fails(mmar_copy, protected, "validate", str(mmar_copy), "--set", f"DATASET_JSON={datalist}",
                  match=["cannot read image", case["image"]])
    # epochs=3: the copied MMAR finished 2 epochs, so a third is trained (a finished run re-run reads nothing)
    _assert_fails(mmar_copy, protected, "train", str(mmar_copy), "--set", f"DATASET_JSON={datalist}", "epochs=3",
                  match=["cannot read image", case["image"]])


def test_shape_mismatch(mmar_copy, tmp_path):
    protected = _protected(mmar_copy)

    def crop_label(image, label):
        source = nib.load(label)
        nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[:-2], source.affine), str(label))

    datalist, case = _datalist_with(mmar_copy, tmp_path, crop_label)
    _assert_fails(mmar_copy, protected, "validate", str(mmar_copy), "--set", f"DATASET_JSON={datalist}",
                  match=["shape mismatch", case["image"], case["label"]])


@pytest.mark.slow
def test_label_on_another_grid(mmar_copy, tmp_path):
    """Same shape, the voxels stored in the other order along x (as another tool may write the label): the
    shapes agree, so only the affines tell that every label voxel would pair with the wrong image voxel."""
    protected = _protected(mmar_copy)

    def reverse_x(image, label):
        source = nib.load(label)
        # the same voxels in the same places, stored from the other end along x
        nib.save(source.as_reoriented(np.array([[0, -1], [1, 1], [2, 1]])), str(label))

    datalist, case = _datalist_with(mmar_copy, tmp_path, reverse_x)
    for command, settings in (("validate", []), ("train", ["epochs=1"])):
        _assert_fails(mmar_copy, protected, command, str(mmar_copy), "--set", f"DATASET_JSON={datalist}", *settings,
                      match=["grid mismatch", case["image"], case["label"], "validation[0]"])


def test_label_values_beyond_the_classes(mmar_copy, tmp_path):
    protected = _protected(mmar_copy)

    def add_class(image, label):
        source = nib.load(label)
        data = np.asarray(source.dataobj).copy()
        data[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(data, source.affine), str(label))

    datalist, case = _datalist_with(mmar_copy, tmp_path, add_class)
    _assert_fails(mmar_copy, protected, "validate", str(mmar_copy), "--set", f"DATASET_JSON={datalist}",
                  match=[case["label"], "[7]", "outside the configured classes 0..2"])


def test_missing_file_and_malformed_datalist(mmar_copy, tmp_path):
    protected = _protected(mmar_copy)
    datalist, case = _datalist_with(mmar_copy, tmp_path, lambda image, label: image.unlink())
    _assert_fails(mmar_copy, protected, "train", str(mmar_copy), "--set", f"DATASET_JSON={datalist}",
                  match=["validation[0].image: file not found", case["image"]])
    datalist.write_text('{"training": [')
    _assert_fails(mmar_copy, protected, "train", str(mmar_copy), "--set", f"DATASET_JSON={datalist}",
                  match=["datalist.json: invalid JSON"])


def test_unknown_config_key_and_corrupt_checkpoint(mmar_copy, tmp_path):
    protected = _protected(mmar_copy)
    _assert_fails(mmar_copy, protected, "train", str(mmar_copy), "--set", "learning_rat=0.1",
                  match=["unknown config key", "learning_rate"])
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    _assert_fails(mmar_copy, protected, "validate", str(mmar_copy), "--ckpt", str(broken),
                  match=["broken.ckpt", "unreadable"])


def test_a_bad_worker_count_names_the_key(mmar_copy):
    protected = _protected(mmar_copy)
    _assert_fails(mmar_copy, protected, "train", str(mmar_copy), "--set", 'train#num_workers="four"',
                  match=["train#num_workers must be", "'four'"])


def test_a_bad_batch_size_names_the_key(mmar_copy):
    protected = _protected(mmar_copy)
    _assert_fails(mmar_copy, protected, "train", str(mmar_copy), "--set", "train#batch_size=0",
                  match=["train#batch_size must be", "got 0"])


def test_a_component_that_cannot_be_built_names_file_and_key(mmar_copy, monkeypatch):
    protected = _protected(mmar_copy)
    monkeypatch.setenv("MMAR_ALLOW_EXPRESSIONS", "1")  # a component through --set is code (docs/security.md)
    _assert_fails(mmar_copy, protected, "validate", str(mmar_copy), "--set", "validate#inferer#sw_batch=2",
                  match=["config_validation.json", "cannot build `validate#inferer`", "sw_batch"])
    _assert_fails(mmar_copy, protected, "train", str(mmar_copy), "--set", "network#_target_=monai.networks.nets.NoSuchNet",
                  match=["config_train.json", "cannot build `network`"])


def test_one_hot_labels_train_like_index_labels(seg_data, tmp_path):
    """Clara's other label convention: a 4D one-hot NIfTI, one channel per class."""
    from conftest import make_seg_mmar

    data_dir = tmp_path / "data"
    shutil.copytree(seg_data.parent, data_dir)
    for path in (data_dir / "labelsTr").glob("*.nii.gz"):
        source = nib.load(path)
        index = np.asarray(source.dataobj).astype(int)
        one_hot = np.stack([(index == c) for c in range(3)], axis=-1).astype(np.uint8)
        nib.save(nib.Nifti1Image(one_hot, source.affine), str(path))
    root = make_seg_mmar(tmp_path / "mmar", data_dir / "datalist.json", epochs=1)
    assert json.loads((root / "config" / "config_train.json").read_text())["num_classes"] == 3
    run_mmar("train", str(root))
    run_mmar("validate", str(root))
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(metrics["dice_per_class"]) == {"1", "2"}
