"""`train#mixup` (engine/mixup.py): the option's checks, the mixing itself, classification's soft targets and
MultiLabelLoss reading them."""

import pytest
import torch

from mmar.engine import mixup
from mmar.errors import MMARError
from mmar.losses import MultiLabelLoss
from mmar.tasks import classification, segmentation


@pytest.mark.parametrize("section, alpha", [(None, None), (False, None), ({"alpha": 0}, None), ({"alpha": 0.4}, 0.4),
                                            ({"alpha": 1}, 1.0)])
def test_alpha(section, alpha):
    assert mixup.mixup_alpha(section) == alpha


@pytest.mark.parametrize("section, words", [
    (0.4, "must be an object"),
    ({"alpha": 0.4, "prob": 1}, "unknown key(s) prob"),
    ({"alpha": -1}, "[0, 100]"),
    ({"alpha": "0.4"}, "got '0.4'"),
    ({"alpha": True}, "got True"),
])
def test_bad_sections_are_named(section, words):
    with pytest.raises(MMARError, match="train#mixup") as error:
        mixup.mixup_alpha(section)
    assert words in str(error.value)


def test_images_and_targets_are_mixed_with_the_same_weight_and_pairing():
    # each image is filled with its own target value: after mixing, every image must still equal its target
    target = torch.rand(16, 3)
    image = target[:, :1, None, None].expand(16, 1, 8, 8).clone()
    torch.manual_seed(0)
    mixed_image, mixed_target = mixup.mix(image, target, alpha=0.4)
    assert torch.allclose(mixed_image[:, 0, 0, 0], mixed_target[:, 0], atol=1e-6)
    assert torch.allclose(mixed_image.amin(dim=(1, 2, 3)), mixed_image.amax(dim=(1, 2, 3)))
    assert not torch.allclose(mixed_target, target)  # something was mixed
    # a convex combination: every mixed value lies between the smallest and largest of its column
    assert (mixed_target >= target.min(0).values - 1e-6).all() and (mixed_target <= target.max(0).values + 1e-6).all()


def test_the_draws_come_from_torchs_generator():
    image, target = torch.rand(8, 1, 4, 4), torch.rand(8, 2)
    torch.manual_seed(3)
    first = mixup.mix(image, target, 0.4)
    torch.manual_seed(3)
    again = mixup.mix(image, target, 0.4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_classification_targets_one_column_per_output():
    make = classification.mixup_targets({"label_format": [1, 3, 1], "label_names": ["a", "b", "c"]})
    labels = torch.tensor([[1, 2, 0], [0, 0, 1]])
    assert make(labels).tolist() == [[1, 0, 0, 1, 0], [0, 1, 0, 0, 1]]


@pytest.mark.parametrize("label_format", [[1, 1, 1], [1, 3, 1], [4]])
def test_soft_targets_of_unmixed_labels_give_the_loss_of_the_labels(label_format):
    torch.manual_seed(0)
    labels = torch.stack([torch.randint(0, max(2, size), (6,)) for size in label_format], dim=1)
    logits = torch.randn(6, sum(label_format))
    loss = MultiLabelLoss(label_format)
    soft = classification.mixup_targets({"label_format": label_format})(labels)
    assert soft.shape == (6, sum(label_format))
    assert loss(logits, soft).item() == pytest.approx(loss(logits, labels).item(), rel=1e-5)


def test_the_loss_of_mixed_targets_is_the_mix_of_the_losses():
    # cross-entropy and BCE are linear in the target: loss(lam*y1 + (1-lam)*y2) = lam*loss(y1) + (1-lam)*loss(y2)
    fmt = [1, 3]
    loss = MultiLabelLoss(fmt)
    make = classification.mixup_targets({"label_format": fmt})
    logits = torch.randn(5, 4)
    y1, y2 = make(torch.tensor([[1, 0]] * 5)), make(torch.tensor([[0, 2]] * 5))
    mixed = loss(logits, 0.3 * y1 + 0.7 * y2)
    assert mixed.item() == pytest.approx(0.3 * loss(logits, y1).item() + 0.7 * loss(logits, y2).item(), rel=1e-5)


def test_a_target_of_neither_layout_is_refused():
    with pytest.raises(ValueError, match=r"\[batch, 2\] \(labels\) or \[batch, 4\] \(soft targets\)"):
        MultiLabelLoss([1, 3])(torch.randn(2, 4), torch.zeros(2, 3))


def test_segmentation_refuses_the_option():
    with pytest.raises(MMARError, match="train#mixup is not available for the segmentation task"):
        mixup.wrap(lambda *a, **k: None, {"alpha": 0.4}, segmentation, {}, log=lambda _line: None)


def test_without_the_option_the_batches_are_untouched():
    prepare = object()
    assert mixup.wrap(prepare, None, classification, {}, log=lambda _line: None) is prepare
