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


def mirror_axes_sets(spatial_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of `spatial_axes`, the empty one (no flip) first: 2**len(axes) views."""
    axes = tuple(int(a) for a in spatial_axes)
    return [subset for size in range(len(axes) + 1) for subset in combinations(axes, size)]


def mirror_average(predict, inputs: torch.Tensor, views: Sequence[tuple[int, ...]], sigmoid: bool = False) -> torch.Tensor:
    """`predict` on `inputs` and each mirror in `views`, flipped back; the log of the averaged softmax
    (or the logit of the averaged sigmoid): a downstream softmax/sigmoid gives the averaged probabilities."""
    spatial_dims = inputs.ndim - 2
    if any(a >= spatial_dims or a < 0 for view in views for a in view):
        raise ValueError(f"mirror axes {sorted({a for v in views for a in v})} do not fit an input with "
                         f"{spatial_dims} spatial axes")
    total = None
    for view in views:
        dims = [a + 2 for a in view]
        x = torch.flip(inputs, dims) if dims else inputs
        out = predict(x)
        out = torch.flip(out, dims) if dims else out
        prob = torch.sigmoid(out.float()) if sigmoid else torch.softmax(out.float(), dim=1)
        total = prob if total is None else total + prob
    mean = total / len(views)
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
        return mirror_average(lambda x: window(x, network, *args, **kwargs), inputs, self.views, self.mirror_sigmoid)
