"""`SegmentationCased`: the checks and label conventions of one Clara segmentation case, in memory."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from mmar.errors import MMARError
from mmar.transforms import SegmentationCased

SHAPE = (1, 4, 5, 6)


def case(label, name="labelsTr/case_007.nii.gz"):
    image = MetaTensor(torch.zeros(SHAPE), meta={"filename_or_obj": "imagesTr/case_007.nii.gz"})
    if isinstance(label, torch.Tensor) and name is not None:
        label = MetaTensor(label, meta={"filename_or_obj": name})
    return {"image": image, "label": label}


def index_label(dtype=torch.float32):
    label = torch.zeros(SHAPE, dtype=dtype)
    label[0, 1, 2, 3] = 1
    label[0, 2, 2, 3] = 2
    return label


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int16, torch.int64])
def test_an_index_label_passes_unchanged(dtype):
    label = index_label(dtype)
    out = SegmentationCased(num_classes=3)(case(label))
    assert torch.equal(torch.as_tensor(out["label"]), label)


def test_a_numpy_label_passes():
    label = index_label().numpy()
    out = SegmentationCased(num_classes=3)({"image": np.zeros(SHAPE, np.float32), "label": label})
    assert np.array_equal(out["label"], label)


@pytest.mark.parametrize("with_background", [True, False])
def test_one_hot_labels_become_the_index_label(with_background):
    index = index_label()[0].long()
    classes = range(3) if with_background else range(1, 3)
    one_hot = torch.stack([(index == c).float() for c in classes])
    out = SegmentationCased(num_classes=3)(case(one_hot))
    assert out["label"].shape == SHAPE
    assert torch.equal(torch.as_tensor(out["label"]), index_label())


@pytest.mark.parametrize("value, shown", [(7.0, "[7]"), (-1.0, "[-1]"), (0.5, "[0.5]"), (3.0, "[3]")])
def test_values_outside_the_classes_are_named_with_the_file(value, shown):
    label = index_label()
    label[0, 0, 0, 0] = value
    with pytest.raises(MMARError) as error:
        SegmentationCased(num_classes=3)(case(label))
    message = str(error.value)
    assert "labelsTr/case_007.nii.gz" in message and shown in message and "0..2" in message
    assert "tensor(" not in message  # the file names the case, not the voxel values


def test_only_the_bad_values_are_listed():
    label = index_label()
    label[0, 0, 0, 0], label[0, 0, 0, 1] = 9, 4
    with pytest.raises(MMARError, match=r"values \[4, 9\]"):
        SegmentationCased(num_classes=3)(case(label))


def test_a_label_without_a_file_name_still_fails_clearly():
    label = index_label()
    label[0, 0, 0, 0] = 5
    with pytest.raises(MMARError, match=r"label \? holds values \[5\]"):
        SegmentationCased(num_classes=3)(case(label, name=None))


def test_a_shape_mismatch_names_both_files():
    label = torch.zeros((1, 4, 5, 7))
    with pytest.raises(MMARError, match="shape mismatch: image imagesTr/case_007.nii.gz .* label labelsTr/case_007"):
        SegmentationCased(num_classes=3)(case(label))


def test_multi_channel_labels_that_are_not_one_hot_are_refused():
    with pytest.raises(MMARError, match="labelsTr/case_007.nii.gz: 3 channels but values are not one-hot"):
        SegmentationCased(num_classes=3)(case(torch.full((3, *SHAPE[1:]), 2.0)))
    with pytest.raises(MMARError, match="one-hot label has 5 channels, expected 3 .* or 2"):
        SegmentationCased(num_classes=3)(case(torch.zeros((5, *SHAPE[1:]))))


def test_a_case_without_label_is_left_alone():
    data = {"image": torch.zeros(SHAPE)}
    assert SegmentationCased(num_classes=3)(data) == data


def _affine(flip_first_axis=False, shift=0.0):
    affine = torch.eye(4, dtype=torch.float64)
    if flip_first_axis:  # the same grid in the other voxel order along x: what another tool may write
        affine[0, 0], affine[0, 3] = -1.0, SHAPE[1] - 1.0
    affine[:3, 3] += shift
    return affine


def on_grids(label, image_affine, label_affine):
    image = MetaTensor(torch.zeros(SHAPE), affine=image_affine, meta={"filename_or_obj": "imagesTr/case_007.nii.gz"})
    label = MetaTensor(label, affine=label_affine, meta={"filename_or_obj": "labelsTr/case_007.nii.gz"})
    return {"image": image, "label": label}


def test_a_label_on_another_grid_names_both_files():
    """Same shape, other voxel order: every label voxel would pair with the wrong image voxel."""
    with pytest.raises(MMARError) as error:
        SegmentationCased(num_classes=3)(on_grids(index_label(), _affine(), _affine(flip_first_axis=True)))
    message = str(error.value)
    assert "grid mismatch" in message and "tensor(" not in message
    assert "labelsTr/case_007.nii.gz" in message and "imagesTr/case_007.nii.gz" in message
    assert "axes RAS" in message and "axes LAS" in message


def test_a_label_shifted_by_a_voxel_is_refused_and_header_rounding_is_not():
    with pytest.raises(MMARError, match="grid mismatch"):
        SegmentationCased(num_classes=3)(on_grids(index_label(), _affine(), _affine(shift=1.0)))
    out = SegmentationCased(num_classes=3)(on_grids(index_label(), _affine(), _affine(shift=1e-5)))
    assert torch.equal(torch.as_tensor(out["label"]), index_label())


def test_a_one_hot_label_is_compared_by_its_spatial_affine():
    index = index_label()[0].long()
    one_hot = torch.stack([(index == c).float() for c in range(3)])
    out = SegmentationCased(num_classes=3)(on_grids(one_hot, _affine(), _affine()))
    assert torch.equal(torch.as_tensor(out["label"]), index_label())
    with pytest.raises(MMARError, match="grid mismatch"):
        SegmentationCased(num_classes=3)(on_grids(one_hot, _affine(), _affine(flip_first_axis=True)))
