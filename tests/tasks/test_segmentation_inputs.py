"""Inputs that used to give a wrong figure or a traceback get one error naming the file or key (issue 31).

* One NaN voxel in an image scored Dice 0.0000 with no word of why (the normalization spreads the NaN over
  the image, the argmax of NaN logits is background).
* `--set spatial_size=[1,2]` on a 3-D segmentation MMAR ended in a MONAI traceback from the sliding window.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import run_mmar
from mmar.errors import MMARError
from runs_support import digests


@pytest.fixture
def mmar(trained_seg_copy):
    return trained_seg_copy


def _one_error(result) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_an_image_with_a_nan_voxel_is_refused_naming_the_file(mmar, seg_data, tmp_path):
    data = json.loads(seg_data.read_text())
    first, second = data["validation"][:2]
    source = nib.load(seg_data.parent / first["image"])
    array = np.asarray(source.dataobj).astype(np.float32)
    array[3, 4, 5] = np.nan
    bad = tmp_path / "nan_scan.nii.gz"
    nib.save(nib.Nifti1Image(array, source.affine), str(bad))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"validation": [
        {"image": str(bad), "label": str(seg_data.parent / first["label"])},
        {key: str(seg_data.parent / value) for key, value in second.items()}]}))
    for command in ("validate", "infer"):
        result = run_mmar(command, str(mmar), "--set", f"DATASET_JSON={datalist}", check=False)
        error = _one_error(result)
        assert error.startswith(f"error: {bad}: 1 of {array.size} voxels are NaN or infinite"), error
        assert "Dice 0" in error
    assert not (mmar / "eval" / "metrics.json").exists()  # no figure was written for it
    assert not list((mmar / "eval").rglob("*_seg.nii.gz"))


def test_a_spatial_size_of_the_wrong_length_is_named(mmar):
    models = mmar / "models"
    before = digests(models)
    expected = ("error: config: spatial_size must be 3 whole numbers >= 1 (or -1 for a whole axis), one per spatial "
                "axis (network#spatial_dims is 3), e.g. spatial_size=[96,96,96]; got [1, 2]")
    for command in (("validate",), ("infer",), ("export", "--formats", "torchscript"), ("train", "--restart")):
        result = run_mmar(command[0], str(mmar), *command[1:], "--set", "spatial_size=[1,2]", check=False)
        assert _one_error(result) == expected, (command, result.stderr)
    assert digests(models) == before  # the training moved nothing to previous/, the export wrote nothing


def test_check_spatial_size():
    from mmar.tasks import check_spatial_size

    for fine in ([16, 16, 16], [96, 96, -1], "@patch", "$[16] * 3"):
        check_spatial_size({"spatial_size": fine}, 3, "[96,96,96]")
    check_spatial_size({}, 3, "[96,96,96]")
    check_spatial_size({"spatial_size": [224, 224]}, 2, "[224,224]")  # classification
    check_spatial_size({"spatial_size": [32, 32], "network": {"spatial_dims": 2}}, 3, "[96,96,96]")
    check_spatial_size({"spatial_size": [32, 32], "network": {"dimensions": 2}}, 3, "[96,96,96]")
    check_spatial_size({"spatial_size": [32, 32, 32], "network": {"spatial_dims": "@dims"}}, 3, "[96,96,96]")
    for wrong in ([1, 2], [16, 16, 0], [16, 16, True], [16.5, 16, 16], 16, "16,16,16", [16, 16, 16, 16]):
        with pytest.raises(MMARError, match=r"spatial_size must be 3 whole numbers"):
            check_spatial_size({"spatial_size": wrong}, 3, "[96,96,96]")
    with pytest.raises(MMARError, match=r"of the task's 2-D images, e.g. spatial_size=\[224,224\]; got \[1, 2, 3\]"):
        check_spatial_size({"spatial_size": [1, 2, 3]}, 2, "[224,224]")
