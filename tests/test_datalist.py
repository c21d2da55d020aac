import json

import nibabel as nib
import numpy as np
import pytest

from mmar.datalist import check_channels_aligned, load_items
from mmar.errors import MMARError


def _nifti(path, shape=(4, 5, 6), affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def _datalist(tmp_path, data):
    path = tmp_path / "lists" / "datalist.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_relative_paths_resolve_against_the_datalist_folder(tmp_path):
    _nifti(tmp_path / "lists" / "img" / "a.nii.gz")
    _nifti(tmp_path / "lists" / "lab" / "a.nii.gz")
    path = _datalist(tmp_path, {"training": [{"image": "img/a.nii.gz", "label": "lab/a.nii.gz", "id": 7}]})
    [item] = load_items(path, "training")
    assert item["image"] == str(tmp_path / "lists" / "img" / "a.nii.gz")
    assert item["label"] == str(tmp_path / "lists" / "lab" / "a.nii.gz")
    assert item["id"] == 7  # extra fields are kept


def test_file_root_overrides_the_datalist_folder(tmp_path):
    _nifti(tmp_path / "elsewhere" / "a.nii.gz")
    path = _datalist(tmp_path, {"training": [{"image": "a.nii.gz", "label": "a.nii.gz"}]})
    [item] = load_items(path, "training", base_dir=tmp_path / "elsewhere")
    assert item["image"] == str(tmp_path / "elsewhere" / "a.nii.gz")


def test_list_of_channels_and_alignment_check(tmp_path):
    _nifti(tmp_path / "lists" / "t1.nii.gz")
    _nifti(tmp_path / "lists" / "t2.nii.gz")
    _nifti(tmp_path / "lists" / "big.nii.gz", shape=(8, 5, 6))
    _nifti(tmp_path / "lists" / "lab.nii.gz")
    path = _datalist(tmp_path, {"training": [{"image": ["t1.nii.gz", "t2.nii.gz"], "label": "lab.nii.gz"},
                                             {"image": ["t1.nii.gz", "big.nii.gz"], "label": "lab.nii.gz"}]})
    good, bad = load_items(path, "training")
    assert good["image"] == [str(tmp_path / "lists" / "t1.nii.gz"), str(tmp_path / "lists" / "t2.nii.gz")]
    check_channels_aligned(good, "image", "case 0")
    with pytest.raises(MMARError, match="big.nii.gz.*not aligned"):
        check_channels_aligned(bad, "image", "case 1")


def test_missing_label_is_allowed_for_inference_only(tmp_path):
    _nifti(tmp_path / "lists" / "a.nii.gz")
    path = _datalist(tmp_path, {"test": [{"image": "a.nii.gz"}, "a.nii.gz"]})
    items = load_items(path, "test", require_label=False)
    assert [set(i) for i in items] == [{"image"}, {"image"}]
    with pytest.raises(MMARError, match=r"test\[0\]: missing 'label'"):
        load_items(path, "test")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON at line 1"),
        ("[]", "JSON object"),
        (json.dumps({"training": []}), "'training' is empty"),
        (json.dumps({"validation": [{"image": "x.nii.gz", "label": "y"}]}), "no list 'training'"),
        (json.dumps({"training": [{"image": "missing.nii.gz", "label": "missing.nii.gz"}]}),
         r"training\[0\]\.image: file not found: .*missing.nii.gz"),
        (json.dumps({"training": [{"image": 3, "label": "x"}]}), r"training\[0\]\.image: must be a file name"),
    ],
)
def test_bad_datalists_name_the_file_and_item(tmp_path, content, message):
    path = tmp_path / "datalist.json"
    path.write_text(content)
    with pytest.raises(MMARError, match=message) as error:
        load_items(path, "training")
    assert "datalist.json" in str(error.value) or "not found" in str(error.value)


def test_configurable_keys(tmp_path):
    _nifti(tmp_path / "lists" / "a.nii.gz")
    path = _datalist(tmp_path, {"training": [{"img": "a.nii.gz", "seg": "a.nii.gz"}]})
    [item] = load_items(path, "training", image_key="img", label_key="seg")
    assert item["img"].endswith("a.nii.gz") and item["seg"].endswith("a.nii.gz")


def test_a_label_on_another_grid_is_refused_naming_both_files(tmp_path):
    """Same shape, the voxels in another order (as another tool may write it): refused from the headers."""
    _nifti(tmp_path / "lists" / "img.nii.gz", affine=np.diag([0.8, 0.8, 2.0, 1.0]))
    label = nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.diag([0.8, 0.8, 2.0, 1.0]))
    reversed_x = label.as_reoriented(np.array([[0, -1], [1, 1], [2, 1]]))  # same places, stored from the other end
    nib.save(reversed_x, str(tmp_path / "lists" / "lab.nii.gz"))
    path = _datalist(tmp_path, {"training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]})
    with pytest.raises(MMARError) as error:
        load_items(path, "training")
    message = str(error.value)
    assert "datalist.json: training[0]: grid mismatch" in message
    assert str(tmp_path / "lists" / "lab.nii.gz") in message and str(tmp_path / "lists" / "img.nii.gz") in message
    assert "axes RAS" in message and "axes LAS" in message


def test_a_one_hot_label_on_the_image_grid_is_accepted(tmp_path):
    affine = np.array([[0, -1.0, 0, 10], [1.0, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    _nifti(tmp_path / "lists" / "img.nii.gz", affine=affine)
    _nifti(tmp_path / "lists" / "onehot.nii.gz", shape=(4, 5, 6, 3), affine=affine)  # one channel per class
    _nifti(tmp_path / "lists" / "shifted.nii.gz", shape=(4, 5, 6, 3), affine=affine + _shift(0.5))
    path = _datalist(tmp_path, {"training": [{"image": "img.nii.gz", "label": "onehot.nii.gz"}],
                                "validation": [{"image": "img.nii.gz", "label": "shifted.nii.gz"}]})
    [item] = load_items(path, "training")
    assert item["label"].endswith("onehot.nii.gz")
    with pytest.raises(MMARError, match=r"validation\[0\]: grid mismatch"):
        load_items(path, "validation")


def _shift(mm):
    shift = np.zeros((4, 4))
    shift[:3, 3] = mm
    return shift


def test_lists_present_names_only_lists_of_items(tmp_path):
    path = _datalist(tmp_path, {"label_format": [1, 3], "label_names": ["a", "b"], "description": "x",
                                "validation": [{"image": "a.png", "label": [0, 1]}], "test": ["a.png"]})
    with pytest.raises(MMARError, match=r"no list 'training' \(lists present: validation, test\)"):
        load_items(path, "training")


@pytest.mark.parametrize("label", ["1", ["0", "2"], "0.0"])
def test_a_quoted_number_label_is_a_value_not_a_file(tmp_path, label):
    _nifti(tmp_path / "lists" / "a.nii.gz")
    path = _datalist(tmp_path, {"training": [{"image": "a.nii.gz", "label": label}]})
    [item] = load_items(path, "training")
    assert item["label"] == label  # left for the label check (label_format) to read as numbers
