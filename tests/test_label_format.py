"""label_format parsing and item checks; the mixed BCE + CE loss and the per-label metrics it feeds."""

import math

import pytest
import torch

from mmar import label_format as lf
from mmar.classification_metrics import label_accuracies, label_aucs, summary
from mmar.classification_transforms import activate
from mmar.errors import MMARError
from mmar.losses import MultiLabelLoss


def test_binary_format():
    fmt = lf.parse([1, 1, 1])
    assert fmt.num_outputs == 3 and fmt.columns() == ["label_0", "label_1", "label_2"]
    assert lf.check_label([0, 1, 1], fmt, "x") == [0, 1, 1]
    assert lf.check_label([1.0, 0.0, 1], fmt, "x") == [1, 0, 1]  # integral floats are fine


def test_categorical_and_mixed_format():
    fmt = lf.parse([1, 3, 1, 2], ["a", "view", "b", "sex"])
    assert fmt.num_outputs == 7
    assert fmt.segments() == [(0, 1), (1, 4), (4, 5), (5, 7)]
    assert fmt.columns() == ["a", "view=0", "view=1", "view=2", "b", "sex=0", "sex=1"]
    assert lf.check_label([1, 2, 0, 1], fmt, "x") == [1, 2, 0, 1]


@pytest.mark.parametrize("value", [[], [0], [1, -2], [1, 1.5], [True], "1,1", None, [1, "2"]])
def test_bad_formats_are_refused(value):
    with pytest.raises(MMARError, match="label_format"):
        lf.parse(value)


def test_bad_names_are_refused():
    with pytest.raises(MMARError, match="label_names.*2 non-empty names"):
        lf.parse([1, 1], ["only one"])
    with pytest.raises(MMARError, match="'a' appears more than once"):
        lf.parse([1, 1], ["a", "a"])


@pytest.mark.parametrize(
    "label, message",
    [
        ([0, 1], r"label has 2 values, label_format \[1, 3, 1\] has 3 labels"),
        ([0, 1, 0, 1], "label has 4 values"),
        ([2, 0, 0], r"label\[0\] \(a\) is 2; label_format says it is a binary label \(0 or 1\)"),
        ([0, 3, 0], r"label\[1\] \(view\) is 3; .*categorical label with 3 classes \(0..2\)"),
        ([0, 1, -1], r"label\[2\] \(b\) is -1"),
        ([0, 1.5, 0], r"label\[1\] \(view\) is 1.5"),
        ([0, "one", 0], r"label\[1\] \(view\) is 'one'"),
        ([0, "1.5", 0], r"label\[1\] \(view\) is '1.5'"),
        ("1", "label must be a list of 3 numbers"),
        (1, "label must be a list of 3 numbers"),
    ],
)
def test_label_mismatches_name_the_item(label, message):
    fmt = lf.parse([1, 3, 1], ["a", "view", "b"])
    with pytest.raises(MMARError, match=message) as caught:
        lf.check_items([{"image": "ok.png", "label": [0, 0, 0]}, {"image": "bad.png", "label": label}], fmt,
                       "dl.json: training")
    assert "dl.json: training[1] (bad.png)" in str(caught.value)


def test_quoted_numbers_are_labels_as_clara_datalists_write_them():
    fmt = lf.parse([1, 3, 1], ["a", "view", "b"])
    assert lf.check_label(["0", "2", "1"], fmt, "x") == [0, 2, 1]
    assert lf.check_label(["1.0", 2, " 0 "], fmt, "x") == [1, 2, 0]
    single = lf.parse([3], ["view"])  # one label: the bare value, quoted or not, is that label
    for label in ("2", 2, ["2"], [2.0]):
        assert lf.check_label(label, single, "x") == [2]
    with pytest.raises(MMARError, match=r"label\[0\] \(view\) is '3'; .*3 classes"):
        lf.check_label("3", single, "x")
    with pytest.raises(MMARError, match=r"label\[0\] \(view\) is 'nan'"):
        lf.check_label("nan", single, "x")


def test_datalist_without_label_format_is_explained():
    with pytest.raises(MMARError, match="needs 'label_format'"):
        lf.from_datalist({"training": []}, "dl.json")


def test_loss_mixes_bce_and_ce():
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    target = torch.tensor([[0, 2, 1], [1, 0, 0], [1, 1, 1], [0, 2, 0]], dtype=torch.float32)
    loss = MultiLabelLoss([1, 3, 1])(logits, target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = (bce(logits[:, 0], target[:, 0]) + torch.nn.functional.cross_entropy(logits[:, 1:4], target[:, 1].long())
                + bce(logits[:, 4], target[:, 2])) / 3
    assert torch.isclose(loss, expected)
    with pytest.raises(ValueError, match="expected \\[batch, 5\\]"):
        MultiLabelLoss([1, 3, 1])(torch.randn(4, 4), target)


def test_label_smoothing_pulls_binary_targets_to_the_middle_and_smooths_each_categorical_segment():
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    target = torch.tensor([[0, 2, 1], [1, 0, 0], [1, 1, 1], [0, 2, 0]], dtype=torch.float32)
    loss = MultiLabelLoss([1, 3, 1], label_smoothing=0.2)(logits, target)
    bce, ce = torch.nn.functional.binary_cross_entropy_with_logits, torch.nn.functional.cross_entropy
    expected = (bce(logits[:, 0], target[:, 0] * 0.8 + 0.1)
                + ce(logits[:, 1:4], target[:, 1].long(), label_smoothing=0.2)
                + bce(logits[:, 4], target[:, 2] * 0.8 + 0.1)) / 3
    assert torch.isclose(loss, expected)
    # soft targets (mixup's layout) are smoothed alike: a one-hot segment gives the same loss as its index
    soft = torch.cat([target[:, :1], torch.nn.functional.one_hot(target[:, 1].long(), 3).float(), target[:, 2:]], 1)
    assert torch.isclose(MultiLabelLoss([1, 3, 1], label_smoothing=0.2)(logits, soft), expected)
    # a well-fitted logit is no longer pushed further: the smoothed target's optimum is finite
    confident = torch.tensor([[8.0]], requires_grad=True)
    MultiLabelLoss([1], label_smoothing=0.1)(confident, torch.tensor([[1.0]])).backward()
    assert confident.grad.item() > 0  # a gradient step lowers the logit back towards logit(0.95)
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="label_smoothing must be a number in \\[0, 1\\)"):
            MultiLabelLoss([1], label_smoothing=bad)


def test_activation_is_sigmoid_and_softmax_per_segment():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0]])
    probs = activate(logits, [1, 3, 1])
    assert torch.allclose(probs[0, 0], torch.tensor(0.5))
    assert torch.allclose(probs[0, 1:4], torch.full((3,), 1 / 3))
    assert torch.allclose(probs[0, 4], torch.sigmoid(torch.tensor(2.0)))


def test_per_label_auc_and_accuracy():
    fmt = lf.parse([1, 3], ["b", "c"])
    labels = torch.tensor([[0, 0], [1, 1], [0, 2], [1, 0]], dtype=torch.float32)
    # binary label perfectly ranked; categorical: classes 0 and 1 ranked perfectly, class 2 inverted
    probs = torch.tensor([
        [0.1, 0.8, 0.1, 0.1],
        [0.9, 0.1, 0.8, 0.1],
        [0.2, 0.1, 0.1, 0.0],
        [0.7, 0.7, 0.2, 0.1],
    ])
    aucs = label_aucs(probs, labels, fmt)
    assert aucs[0] == 1.0
    assert math.isclose(aucs[1], (1.0 + 1.0 + 0.0) / 3)
    assert label_accuracies(probs, labels, fmt) == [1.0, 0.75]
    # a label with one class only has no AUC; the mean skips it instead of becoming NaN
    result = summary(probs, torch.tensor([[0, 0], [0, 1], [0, 2], [0, 0]], dtype=torch.float32), fmt)
    assert result["labels_without_auc"] == ["b"] and math.isclose(result["mean_auc"], result["auc_per_label"]["c"])


@pytest.mark.parametrize("named", [True, False])
def test_the_label_transform_names_the_image_file_not_its_pixels(named):
    from monai.data import MetaTensor

    from mmar.classification_transforms import ClassificationLabeld

    pixels = torch.rand(1, 64, 64)
    image = MetaTensor(pixels, meta={"filename_or_obj": "images/00001.png"}) if named else pixels
    transform = ClassificationLabeld(keys="label", label_format=[1, 1])
    assert transform({"image": image, "label": [1, 0]})["label"].tolist() == [1.0, 0.0]
    with pytest.raises(MMARError, match=r"label\[0\] \(label_0\) is 2") as caught:
        transform({"image": image, "label": [2, 0]})
    assert ("images/00001.png" in str(caught.value)) == named
    assert "tensor(" not in str(caught.value)
    # before loading (a path in the item), the path names it
    with pytest.raises(MMARError, match="images/raw.png"):
        transform({"image": "images/raw.png", "label": [2, 0]})
