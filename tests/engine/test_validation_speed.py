"""The per-epoch validation's fast path: plain tensors, a faster channel argmax, caching in the background."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscrete as MONAIAsDiscrete
from monai.transforms import AsDiscreted as MONAIAsDiscreted

from mmar.engine.data import InBackground
from mmar.transforms import AsDiscreted, FirstMaxAsDiscrete


def _logits_with_ties(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 12, 14, 10, generator=generator)
    logits[:, :4] = 0.0  # all classes equal: the first one wins in both
    logits[0, 4:6], logits[1:, 4:6] = -1.0, 2.0  # classes 1 and 2 tie
    return logits


@pytest.mark.parametrize("wrap", [lambda t: t, MetaTensor], ids=["tensor", "metatensor"])
def test_the_first_max_argmax_equals_monai_s(wrap):
    logits = _logits_with_ties()
    label = torch.randint(0, 3, (1, 12, 14, 10), generator=torch.Generator().manual_seed(1)).float()
    ours = AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[3, 3])(
        {"pred": wrap(logits.clone()), "label": wrap(label.clone())})
    theirs = MONAIAsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[3, 3])(
        {"pred": wrap(logits.clone()), "label": wrap(label.clone())})
    for key in ("pred", "label"):
        assert ours[key].shape == theirs[key].shape == (3, 12, 14, 10)
        assert ours[key].dtype == theirs[key].dtype
        assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key]))
    # tied voxels go to the first of the tied classes, as torch.argmax does
    assert torch.all(ours["pred"][0, :4] == 1) and torch.all(ours["pred"][1, 4:6] == 1)


def test_plain_tensors_stay_plain_and_metatensors_keep_their_metadata():
    logits = _logits_with_ties()
    plain = FirstMaxAsDiscrete(argmax=True, to_onehot=3)(logits)
    assert type(plain) is torch.Tensor  # the metric after it runs without MetaTensor's dispatch
    meta = MetaTensor(logits, meta={"filename_or_obj": "case_001.nii.gz"})
    out = FirstMaxAsDiscrete(argmax=True, to_onehot=3)(meta)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "case_001.nii.gz"


def test_without_argmax_and_for_numpy_it_is_monai_s_asdiscrete():
    values = np.array([[[0.2, 0.7], [0.5, 0.9]]], dtype=np.float32)
    for kwargs in ({"threshold": 0.5}, {"argmax": True}, {"rounding": "torchrounding"}):
        ours, theirs = FirstMaxAsDiscrete(**kwargs)(values), MONAIAsDiscrete(**kwargs)(values)
        assert type(ours) is type(theirs)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_in_background_returns_the_value_and_raises_the_error_in_the_caller():
    started = threading.Event()

    def slow():
        started.set()
        time.sleep(0.05)
        return 42

    work = InBackground(slow, name="test-work")
    assert started.wait(5) and work.result() == 42

    def failing():
        raise ValueError("unreadable case")

    with pytest.raises(ValueError, match="unreadable case"):
        InBackground(failing, name="test-error").result()


def test_in_background_does_not_keep_a_failing_process_alive():
    """The caching thread is a daemon: a config error in the main thread exits without waiting for it."""
    blocker = threading.Event()
    work = InBackground(lambda: blocker.wait(60), name="test-daemon")
    assert work._thread.daemon
    blocker.set()
    assert work.result() is True


def test_training_validation_caches_plain_tensors_and_mmar_validate_keeps_metadata(seg_mmar):
    from mmar.archive import load_archive
    from mmar.engine.workflow import build_dataset, keys_of, section_items

    archive = load_archive(seg_mmar)
    parser = archive.parser()
    keys = list(keys_of(archive.config))
    items = section_items(archive, "validate")[:2]
    per_epoch = build_dataset(parser, "validate", items, keys=keys, with_augmentation=False, plain=True)
    report = build_dataset(parser, "validate", items, keys=keys, with_augmentation=False)
    for key in keys:
        assert type(per_epoch[0][key]) is torch.Tensor
        assert isinstance(report[0][key], MetaTensor)  # `mmar validate` names each case's file
        assert torch.equal(per_epoch[0][key], report[0][key].as_tensor())
