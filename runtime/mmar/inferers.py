"""Inferers MONAI does not have: test-time mirroring, as nnU-Net validates and predicts.

MONAI's `TestTimeAugmentation` draws random invertible transforms on the dataset side and needs the
whole preprocessing to be invertible; mirroring needs none of that: the network runs on the input and
its flips, each prediction is flipped back and the class probabilities are averaged.
`SlidingWindowMirrorInferer` is the sliding window with mirroring (the default of `mmar validate` and
`mmar infer` for segmentation); `MirrorEnsembleInferer` wraps any other inferer.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Sequence

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import convert_to_dst_type, convert_to_tensor, fall_back_tuple


def mirror_axes_sets(spatial_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of `spatial_axes`, the empty one (no flip) first: 2**len(axes) views."""
    axes = tuple(int(a) for a in spatial_axes)
    return [subset for size in range(len(axes) + 1) for subset in combinations(axes, size)]


def mirror_average(predict, inputs: torch.Tensor, views: Sequence[tuple[int, ...]], sigmoid: bool = False,
                   batched: bool = False) -> torch.Tensor:
    """`predict` on `inputs` and each mirror in `views`, flipped back; the log of the averaged softmax
    (or the logit of the averaged sigmoid): a downstream softmax/sigmoid gives the averaged probabilities.

    `batched`: one `predict` call on all the mirrors stacked along the batch axis instead of one call per
    mirror; the caller decides that the stacked input and output fit in memory."""
    spatial_dims = inputs.ndim - 2
    if any(a >= spatial_dims or a < 0 for view in views for a in view):
        raise ValueError(f"mirror axes {sorted({a for v in views for a in v})} do not fit an input with "
                         f"{spatial_dims} spatial axes")
    flips = [[a + 2 for a in view] for view in views]
    if batched:
        plain = convert_to_tensor(inputs, track_meta=False)  # no per-mirror metadata
        stacked = torch.cat([torch.flip(plain, dims) if dims else plain for dims in flips])
        outputs = torch.split(predict(stacked), inputs.shape[0])
    else:
        outputs = (predict(torch.flip(inputs, dims) if dims else inputs) for dims in flips)
    total = None
    for dims, out in zip(flips, outputs):
        out = torch.flip(out, dims) if dims else out
        prob = torch.sigmoid(out.float()) if sigmoid else torch.softmax(out.float(), dim=1)
        total = prob if total is None else total + prob
    mean = total / len(views)
    if batched:
        mean = convert_to_dst_type(mean, inputs, dtype=mean.dtype)[0]  # the input's metadata, as one call gives
    eps = 1e-7
    if sigmoid:
        mean = mean.clamp(eps, 1 - eps)
        return torch.log(mean) - torch.log1p(-mean)
    return torch.log(mean.clamp_min(eps))


class MirrorEnsembleInferer(Inferer):
    """Any inferer, on the input and its mirrors along `spatial_axes` (0 = first spatial axis), averaged.

    Returns the log of the averaged probabilities (see `mirror_average`). `sigmoid=True` averages sigmoids
    instead (multi-label outputs).
    """

    def __init__(self, inferer: Inferer, spatial_axes: Sequence[int] = (0, 1, 2), sigmoid: bool = False):
        super().__init__()
        if not callable(inferer):
            raise TypeError(f"inferer must be a MONAI Inferer, got {type(inferer).__name__}")
        self.inferer = inferer
        self.views = mirror_axes_sets(spatial_axes)
        self.sigmoid = bool(sigmoid)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return mirror_average(lambda x: self.inferer(x, network, *args, **kwargs), inputs, self.views, self.sigmoid)


class SlidingWindowMirrorInferer(SlidingWindowInferer):
    """MONAI's `SlidingWindowInferer` (same arguments) on the volume and its mirrors along `mirror_axes`.

    One flat component rather than a wrapper, so that the sliding-window keys (`--set
    validate#inferer#sw_batch_size=4`, ...) are where they are for the plain window. `mirror_axes=[]` is the
    plain sliding window.
    """

    def __init__(self, *args: Any, mirror_axes: Sequence[int] = (0, 1, 2), mirror_sigmoid: bool = False,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.views = mirror_axes_sets(mirror_axes)
        self.mirror_sigmoid = bool(mirror_sigmoid)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        window = super().__call__
        return mirror_average(lambda x: window(x, network, *args, **kwargs), inputs, self.views, self.mirror_sigmoid,
                              batched=self.fits_one_window(inputs))

    def fits_one_window(self, inputs: torch.Tensor) -> bool:
        """Whether the volume is within one window: then its mirrors go through the sliding window as one
        batch (MONAI groups the windows of a batch `sw_batch_size` at a time): one network call for 8
        mirrors instead of 8 (a GPU's inference is launch-bound; on a 2-core CPU the network's part is
        0.81x), and the stacked input and output are 8 windows' worth, what the sliding window holds
        anyway. A larger volume keeps one pass per mirror, so its accumulators stay one volume's size."""
        spatial = tuple(inputs.shape[2:])
        roi = fall_back_tuple(self.roi_size, spatial)  # MONAI: a non-positive size means the input's
        return all(size <= window for size, window in zip(spatial, roi))
