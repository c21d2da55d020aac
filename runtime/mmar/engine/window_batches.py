"""Validation cases batched for a sliding-window inferer, with exactly the per-case result.

`sliding_window_inference` pads a case smaller than the window symmetrically (constant `cval`) up to the
window, runs its windows `sw_batch_size` at a time and crops the padding off again. Cases whose padded shape
is the same have the same windows, so they can share network calls: padded in the collate exactly as the
inferer would pad each alone, inferred as one batch, and cropped back (prediction and label) before the
metric. For the default segmentation recipe on hippocampus (33 of the 41 validation cases fit in one
40x56x40 window, the other 8 have 5 padded shapes of 2 windows) an epoch's validation takes 10 network calls
instead of 41; each call is launch-bound on a GPU. Only the per-epoch validation in training uses this:
`mmar validate` keeps one case per step (it writes each case's files from its metadata).

The padding is one `F.pad`, the call `sliding_window_inference` itself makes, rather than MONAI's
`SpatialPad` (which would turn the plain tensors back into MetaTensors); the crop is its exact inverse,
which MONAI's `CenterSpatialCrop` is not for odd differences (it centres on size // 2).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.data import list_data_collate
from monai.inferers import SlidingWindowInferer
from monai.transforms import MapTransform
from torch.utils.data import Sampler

SHAPE_KEY = "window_batch_shape"  # a case's own spatial shape, recorded by the collate for the crop


def window_padded_shape(shape: Sequence[int], roi_size: Sequence[int]) -> tuple[int, ...]:
    """The shape `sliding_window_inference` pads a case of `shape` to before it places windows."""
    return tuple(max(int(size), int(window)) for size, window in zip(shape, roi_size))


def batchable_window(inferer: Any, spatial_dims: int) -> tuple[int, ...] | None:
    """The window of a sliding-window inferer whose per-case result batching can reproduce, else None."""
    if not isinstance(inferer, SlidingWindowInferer) or str(inferer.padding_mode) != "constant":
        return None
    roi = inferer.roi_size
    roi = (roi,) * spatial_dims if isinstance(roi, int) else tuple(roi)
    if len(roi) != spatial_dims or any(int(size) <= 0 for size in roi):  # non-positive: "the whole image"
        return None
    return tuple(int(size) for size in roi)


class SameWindowBatches(Sampler):
    """Batches (lists of dataset indices) of at most `max_cases` cases with the same window-padded shape,
    in dataset order within each shape."""

    def __init__(self, shapes: Sequence[Sequence[int]], roi_size: Sequence[int], max_cases: int):
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, shape in enumerate(shapes):
            groups.setdefault(window_padded_shape(shape, roi_size), []).append(index)
        step = max(1, int(max_cases))
        self.batches = [members[start:start + step] for members in groups.values()
                        for start in range(0, len(members), step)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def pad_symmetric(tensor: torch.Tensor, shape: Sequence[int], value: float) -> torch.Tensor:
    """`tensor` (channels first) padded to spatial `shape` as `sliding_window_inference` pads: half of the
    difference (rounded down) before, the rest after, constant `value`."""
    pad: list[int] = []
    for size, target in reversed(list(zip(tensor.shape[1:], shape))):
        diff = int(target) - int(size)
        pad += [diff // 2, diff - diff // 2]
    return F.pad(tensor, pad, mode="constant", value=value) if any(pad) else tensor


class PadToWindowCollate:
    """Collate for `SameWindowBatches`: each case padded to its window-padded shape (image with the
    inferer's `cval`, label with 0), its own shape recorded under SHAPE_KEY."""

    def __init__(self, roi_size: Sequence[int], image_key: str, label_key: str, cval: float = 0.0):
        self.roi_size, self.image_key, self.label_key, self.cval = tuple(roi_size), image_key, label_key, float(cval)

    def __call__(self, items: Sequence[Mapping[Hashable, Any]]):
        padded = []
        for item in items:
            item = dict(item)
            shape = tuple(item[self.image_key].shape[1:])
            target = window_padded_shape(shape, self.roi_size)
            item[self.image_key] = pad_symmetric(torch.as_tensor(item[self.image_key]), target, self.cval)
            if isinstance(item.get(self.label_key), torch.Tensor):
                item[self.label_key] = pad_symmetric(item[self.label_key], target, 0.0)
            item[SHAPE_KEY] = torch.tensor(shape)
            padded.append(item)
        return list_data_collate(padded)


class CropWindowPaddingd(MapTransform):
    """Post-processing for one decollated case of a `PadToWindowCollate` batch: `keys` cropped back to the
    case's own shape (the inverse of `pad_symmetric`). A case without SHAPE_KEY passes unchanged."""

    def __init__(self, keys: Sequence[str], allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if SHAPE_KEY not in d:
            return d
        shape = [int(size) for size in d[SHAPE_KEY]]
        for key in self.key_iterator(d):
            full = d[key].shape[1:]
            starts = [(int(f) - s) // 2 for f, s in zip(full, shape)]
            d[key] = d[key][(slice(None), *(slice(b, b + s) for b, s in zip(starts, shape)))]
        return d
