"""engine/window_batches.py: validation cases batched for a sliding-window inferer give the per-case result."""

from __future__ import annotations

import torch
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.inferers import SimpleInferer, SlidingWindowInferer, sliding_window_inference
from monai.networks.nets import UNet
from monai.transforms import AsDiscreted, Compose
from torch.utils.data import Dataset

from mmar.engine.data import make_loader
from mmar.engine.window_batches import (
    SHAPE_KEY, CropWindowPaddingd, PadToWindowCollate, SameWindowBatches, batchable_window, pad_symmetric,
    window_padded_shape,
)

ROI = (16, 16, 12)


class _Cases(Dataset):
    """Cached-like cases of different shapes: smaller than the window, equal to it, and larger (2 windows)."""

    shapes = [(13, 15, 9), (16, 16, 12), (11, 16, 12), (13, 15, 9), (20, 14, 12), (16, 9, 7), (20, 14, 12)]

    def __init__(self):
        generator = torch.Generator().manual_seed(3)
        self.items = []
        for shape in self.shapes:
            image = torch.randn(1, *shape, generator=generator)
            label = (image > 0.3).float() + (image > 1.2).float()
            self.items.append({"image": image, "label": label})
        self.cache_num = len(self.items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return dict(self.items[index])


def test_cases_are_grouped_by_the_shape_the_sliding_window_pads_them_to():
    shapes = _Cases.shapes
    assert window_padded_shape((13, 15, 9), ROI) == ROI and window_padded_shape((20, 14, 12), ROI) == (20, 16, 12)
    batches = list(SameWindowBatches(shapes, ROI, max_cases=2))
    assert sorted(i for batch in batches for i in batch) == list(range(len(shapes)))
    assert batches == [[0, 1], [2, 3], [5], [4, 6]]
    for batch in batches:
        assert len({window_padded_shape(shapes[i], ROI) for i in batch}) == 1 and len(batch) <= 2


def test_the_collate_pads_as_the_inferer_and_the_crop_undoes_it():
    case = torch.arange(13 * 15 * 9, dtype=torch.float32).reshape(1, 13, 15, 9)
    padded = pad_symmetric(case, ROI, value=-1.0)
    assert padded.shape == (1, *ROI)
    # sliding_window_inference's own padding of a single case: half of the difference before, rest after
    expected = torch.nn.functional.pad(case, [1, 2, 0, 1, 1, 2], value=-1.0)
    assert torch.equal(padded, expected)
    batch = PadToWindowCollate(ROI, "image", "label", cval=-1.0)([{"image": case, "label": case.clone()}])
    assert batch["image"].shape == (1, 1, *ROI) and batch[SHAPE_KEY].tolist() == [[13, 15, 9]]
    cropped = CropWindowPaddingd(keys=["pred", "label"])(
        {"pred": batch["image"][0], "label": batch["label"][0], SHAPE_KEY: batch[SHAPE_KEY][0]})
    assert torch.equal(cropped["pred"], case) and torch.equal(cropped["label"], case)


def test_only_a_constant_padded_sliding_window_is_batched():
    assert batchable_window(SlidingWindowInferer(roi_size=ROI, sw_batch_size=4), 3) == ROI
    assert batchable_window(SlidingWindowInferer(roi_size=16, sw_batch_size=4), 3) == (16, 16, 16)
    assert batchable_window(SimpleInferer(), 3) is None
    assert batchable_window(SlidingWindowInferer(roi_size=ROI, padding_mode="reflect"), 3) is None
    assert batchable_window(SlidingWindowInferer(roi_size=(16, -1, 12)), 3) is None


def _per_case_dice(loader, inferer, network, postprocessing):
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=network, inferer=inferer,
        postprocessing=postprocessing,
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]),
                                         save_details=True)},
    )
    evaluator.run()
    return evaluator.state.metric_details["dice"], evaluator.state.metrics["dice"]


def test_batched_validation_gives_each_case_its_per_case_dice():
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    inferer = SlidingWindowInferer(roi_size=ROI, sw_batch_size=4, overlap=0.25, mode="gaussian", cval=-0.5)
    discrete = AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[3, 3])
    dataset = _Cases()

    per_case = make_loader(dataset, num_workers=0)
    window = batchable_window(inferer, 3)
    batched = make_loader(dataset, batch_sampler=SameWindowBatches(_Cases.shapes, window, inferer.sw_batch_size),
                          collate_fn=PadToWindowCollate(window, "image", "label", cval=inferer.cval), num_workers=0)
    assert len(batched) == 3  # 7 cases, 3 network-call groups

    details_one, mean_one = _per_case_dice(per_case, inferer, network, Compose([discrete]))
    details_batched, mean_batched = _per_case_dice(
        batched, inferer, network, Compose([CropWindowPaddingd(keys=["pred", "label"]), discrete]))
    order = [i for batch in batched.batch_sampler for i in batch]
    assert torch.allclose(details_batched, details_one[order], atol=1e-5, equal_nan=True)
    assert abs(mean_batched - mean_one) < 1e-5

    # and the predictions themselves: the batched logits, cropped, are the single-case inference's
    with torch.no_grad():
        for batch_indices in batched.batch_sampler:
            batch = batched.collate_fn([dataset[i] for i in batch_indices])
            logits = inferer(batch["image"], network)
            for row, index in enumerate(batch_indices):
                own = sliding_window_inference(dataset[index]["image"][None], ROI, 4, network, overlap=0.25,
                                               mode="gaussian", cval=-0.5)[0]
                mine = CropWindowPaddingd(keys=["pred"])({"pred": logits[row], SHAPE_KEY: batch[SHAPE_KEY][row]})
                assert torch.allclose(mine["pred"], own, atol=1e-5)
