"""The few transforms MONAI does not have: loading that names the file at fault, and the checks and
label conventions of a Clara segmentation case. Everything else in a recipe is a MONAI transform
declared in the config.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscrete, LoadImaged, MapTransform
from monai.transforms import AsDiscreted as MONAIAsDiscreted
from monai.utils import convert_to_tensor

from mmar.datalist import grid_mismatch, same_grid
from mmar.errors import MMARError


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _one_line(error: BaseException) -> str:
    """A reader's error in one line: MONAI's 'no suitable reader' message carries every reader's traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} ... {lines[-1]}"


def source_file(tensor: Any, fallback: str = "?") -> str:
    meta = getattr(tensor, "meta", None) or {}
    name = meta.get("filename_or_obj", fallback)
    if isinstance(name, (list, tuple)):  # channels read from several files: the first names the case
        name = name[0] if name else fallback
    return str(name)


class LoadCased(MapTransform):
    """`LoadImaged`, one key at a time, so an unreadable or truncated file is named in the error.

    A list of files under one key is read as channels (MONAI stacks them on a new first axis).
    """

    def __init__(self, keys, allow_missing_keys: bool = False, **loader_kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        loader_kwargs.setdefault("image_only", True)
        self.loaders = {key: LoadImaged(keys=[key], **loader_kwargs) for key in self.keys}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d = self.loaders[key](d)
            except Exception as error:
                root = error
                while root.__cause__ is not None:
                    root = root.__cause__
                raise MMARError(f"cannot read {key} {_describe(data[key])}: {self._why(key, data[key], root)}") from None
        return d

    def _why(self, key: Hashable, files: Any, error: BaseException) -> str:
        """The cause in one line. When MONAI tried every reader, the one asked for in the config is the one
        whose error says what is wrong with the file: the fallbacks fail on something else (pydicom's
        `dcmread() got an unexpected keyword argument 'converter'` for a PNG that is not one)."""
        loader = getattr(self.loaders[key], "_loader", None)  # LoadImaged's LoadImage
        if ("cannot find a suitable reader" not in str(error) or loader is None or loader.auto_select
                or not loader.readers):
            return _one_line(error)
        chosen = loader.readers[-1]  # registered last, tried first: the reader the config names
        try:
            chosen.read(files if isinstance(files, (list, tuple)) else str(files))
        except Exception as own_error:
            return f"not a readable image ({type(chosen).__name__}: {_one_line(own_error)})"
        return _one_line(error)


class SegmentationCased(MapTransform):
    """Check a loaded (channel-first) image/label pair and bring the label to one index channel.

    Clara labels are either an integer index mask, or one-hot with one channel per class (with or without
    the background channel). Image and label must share the grid: the spatial shape and the affine (a label
    written in another voxel order has the image's shape and pairs every voxel with the wrong one); label
    values must be classes.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", num_classes: int = 2) -> None:
        super().__init__([label_key], allow_missing_keys=True)
        self.image_key, self.label_key, self.num_classes = image_key, label_key, int(num_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.label_key not in d:
            return d
        image, label = d[self.image_key], d[self.label_key]
        # the label's file is named only in an error: no fallback built from the tensor, whose str() formats
        # its values (1.5 ms a case, a sixth of the cache's preprocessing, when it was built for every case)
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise MMARError(
                f"shape mismatch: image {source_file(image)} has spatial shape {tuple(image.shape[1:])}, "
                f"label {source_file(label)} has {tuple(label.shape[1:])}"
            )
        image_affine, label_affine = getattr(image, "affine", None), getattr(label, "affine", None)
        if image_affine is not None and label_affine is not None and not same_grid(image_affine, label_affine):
            raise MMARError(grid_mismatch(source_file(image), image_affine, source_file(label), label_affine))
        if label.shape[0] > 1:
            label = self._one_hot_to_index(label)
        bad = self._values_outside_classes(label)
        if bad:
            raise MMARError(
                f"label {source_file(label)} holds values {bad[:5]} outside the configured classes "
                f"0..{self.num_classes - 1} (set num_classes in config/config_train.json if the data has more classes)"
            )
        d[self.label_key] = label
        return d

    def _values_outside_classes(self, label) -> list[int | float]:
        """The label values that are not a class index 0..num_classes-1 (a few, sorted); none for a valid label.

        Three reductions decide the common case; the sorted distinct values (`torch.unique`, ten times as
        long) are computed only for the message."""
        values = convert_to_tensor(label, track_meta=False)  # no MetaTensor dispatch per op
        low, high = torch.aminmax(values)
        whole = not values.is_floating_point() or bool(torch.equal(values, torch.round(values)))
        if low >= 0 and high < self.num_classes and whole:
            return []
        distinct = torch.unique(values)
        bad = distinct[(distinct < 0) | (distinct >= self.num_classes) | (distinct != torch.round(distinct))]
        return [int(v) if float(v).is_integer() else float(v) for v in bad.tolist()]

    def _one_hot_to_index(self, label):
        channels = label.shape[0]
        values = torch.unique(convert_to_tensor(label, track_meta=False))
        if not all(v in (0, 1) for v in values.tolist()):
            raise MMARError(f"label {source_file(label)}: {channels} channels but values are not one-hot (0/1): "
                            f"{values[:5].tolist()}")
        if channels == self.num_classes:
            index = torch.argmax(label, dim=0, keepdim=True)
        elif channels == self.num_classes - 1:  # no background channel: background where no class is set
            index = (torch.argmax(label, dim=0, keepdim=True) + 1) * (label.sum(dim=0, keepdim=True) > 0)
        else:
            raise MMARError(
                f"label {source_file(label)}: one-hot label has {channels} channels, expected {self.num_classes} "
                f"(one per class) or {self.num_classes - 1} (without background)"
            )
        return index.to(label.dtype) if hasattr(index, "to") else index


def spatial_shape(path: str | Sequence[str]) -> tuple[int, ...]:
    """Spatial shape from the header alone (no voxel data read)."""
    import nibabel as nib

    first = path[0] if isinstance(path, (list, tuple)) else path
    try:
        return tuple(int(s) for s in nib.load(first).shape[:3])
    except Exception:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(first))
        reader.ReadImageInformation()
        return tuple(int(s) for s in reader.GetSize())


def nbytes_estimate(item: Mapping[str, Any], keys: Sequence[str]) -> int:
    """Bytes a cached case takes as float32 (header-only read)."""
    total = 0
    for key in keys:
        value = item.get(key)
        if not isinstance(value, (str, list)) or not value:
            continue
        files = value if isinstance(value, list) else [value]
        try:
            total += len(files) * int(np.prod(spatial_shape(files[0]))) * 4
        except Exception:  # unreadable: loading it reports the file and the cause
            continue
    return total


class FirstMaxAsDiscrete(AsDiscrete):
    """MONAI's AsDiscrete with the channel argmax taken as `torch.max(...).indices`.

    The same values (both give the first of equal maxima), but on a CPU `torch.argmax` over the channel
    dimension of a 3-class 40x56x40 volume takes about 11 ms against under 1 ms for `torch.max`: it was a
    quarter of the per-epoch validation of the default segmentation recipe on a 2-core CPU. On a GPU both are
    one kernel.
    """

    def __call__(self, img, argmax=None, to_onehot=None, threshold=None, rounding=None):
        plain = isinstance(img, torch.Tensor) and not isinstance(img, MetaTensor)
        if isinstance(img, torch.Tensor) and (argmax if argmax is not None else self.argmax):
            dim, keepdim = self.kwargs.get("dim", 0), self.kwargs.get("keepdim", True)
            img = torch.max(img, dim=dim, keepdim=keepdim).indices
            argmax = False
        out = super().__call__(img, argmax=argmax, to_onehot=to_onehot, threshold=threshold, rounding=rounding)
        # a plain tensor stays plain (MONAI's makes it a MetaTensor): the metric after it then runs without
        # MetaTensor's dispatch on every op
        return out.as_tensor() if plain and isinstance(out, MetaTensor) else out


class AsDiscreted(MONAIAsDiscreted):
    """MONAI's AsDiscreted (same arguments) through `FirstMaxAsDiscrete`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.converter = FirstMaxAsDiscrete(**self.converter.kwargs)
