"""The few classification transforms MONAI does not have: colour PNG to one channel, the label list checked
against `label_format` and made a tensor, and sigmoid/softmax applied per label segment.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

from mmar.errors import MMARError
from mmar.label_format import LabelFormat, check_label, parse


class PILGrayscale:
    """`PILReader(converter=...)`: colour images to one channel; grayscale (8/16/32-bit, float) untouched.

    RGB, RGBA, palette and grayscale+alpha images are converted by PIL's `convert("L")`, the ITU-R 601-2
    luma transform L = 0.299 R + 0.587 G + 0.114 B; alpha is dropped (not composited), which is what a
    chest X-ray saved as RGBA needs (R = G = B, alpha opaque). Bilevel ("1") images become 0/255.
    """

    KEEP = {"L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}

    def __call__(self, image):
        if image.mode in self.KEEP:
            return image
        if image.mode == "P":  # palette indices are not intensities: expand the palette first
            image = image.convert("RGBA")
        return image.convert("L")


def as_format(label_format: Sequence[int] | LabelFormat, label_names: Sequence[str] | None = None) -> LabelFormat:
    if isinstance(label_format, LabelFormat):
        return label_format
    return parse(list(label_format), list(label_names) if label_names is not None else None)


class ClassificationLabeld(MapTransform):
    """Check an item's label list against `label_format` and make it a float tensor [num_labels].

    The error names the image, so a bad item is found even when the datalist was not checked up front.
    """

    def __init__(self, keys, label_format: Sequence[int], label_names: Sequence[str] | None = None,
                 image_key: str = "image", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.format = as_format(label_format, label_names)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            d[key] = torch.tensor(check_label(value, self.format, self._where(d)), dtype=torch.float32)
        return d

    def _where(self, data: Mapping[Hashable, Any]) -> str:
        """The image's file: from a loaded image's metadata, else the datalist's path. Never str() of a
        loaded image, which formats its pixel values (0.6 ms for a 1024x1024 X-ray, on every item)."""
        from mmar.transforms import source_file

        image = data.get(self.image_key)
        fallback = "?" if isinstance(image, (torch.Tensor, np.ndarray)) else str(image)
        return f"image {source_file(image, fallback)}"


def activate(logits: torch.Tensor, label_format: Sequence[int] | LabelFormat) -> torch.Tensor:
    """Logits [..., C] -> probabilities: sigmoid per binary output, softmax within each categorical segment."""
    fmt = as_format(label_format)
    parts = []
    for (start, stop), size in zip(fmt.segments(), fmt.sizes):
        segment = logits[..., start:stop].float()
        parts.append(torch.sigmoid(segment) if size == 1 else torch.softmax(segment, dim=-1))
    return torch.cat(parts, dim=-1)


class LabelActivationsd(MapTransform):
    """`activate` on the network output of one case ([C]) or a batch ([B, C])."""

    def __init__(self, keys="pred", label_format: Sequence[int] = (1,), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.format = as_format(label_format)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = torch.as_tensor(d[key])
            if pred.shape[-1] != self.format.num_outputs:
                raise MMARError(
                    f"network output has {pred.shape[-1]} values per image, label_format {list(self.format.sizes)} "
                    f"needs {self.format.num_outputs} (network#out_channels must be sum(label_format))"
                )
            d[key] = activate(pred, self.format)
        return d
