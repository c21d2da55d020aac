"""Read and check a Clara datalist.

    {"training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [{"image": ["t1/b.nii.gz", "t2/b.nii.gz"], "label": "labelsTr/b.nii.gz"}]}

`image` may be a list of files (channels, concatenated; spatially aligned). Relative paths are relative
to the base folder (`--file_root` > config `image_base_dir` > `DATA_ROOT` > the datalist's folder).
`label` may be absent where no ground truth is needed (inference). A label file must lie on its image's
grid: same affine (voxel -> world), read from the headers, so a label written in another voxel order by
another tool is refused instead of training on misaligned voxels. Every error names the datalist, the
list, the item and the field.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from pathlib import Path
from typing import Any, Iterator

from mmar.errors import MMARError
from mmar.label_format import label_number

# Two headers describe one grid when their affines agree to this many mm (direction cosines likewise):
# far below any voxel, far above the float32 rounding of a NIfTI header.
AFFINE_TOLERANCE = 1e-3
# lists a classification datalist holds beside its item lists (mmar.label_format)
NOT_ITEM_LISTS = {"label_format", "label_names"}


# the base folder of relative paths where a caller names none (`mmar init --file_root`, see `relative_to`)
_DEFAULT_BASE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("mmar_datalist_base", default=None)
# said when a relative path is missing under the datalist's own folder: Clara's datalists are often relative
# to a data root elsewhere (its --file_root / image_base_dir)
OTHER_ROOT_HINT = ("relative paths are read from the datalist's folder; if they are relative to another folder, "
                   "name it with --file_root DIR (or DATA_ROOT in config/environment.json)")


@contextlib.contextmanager
def relative_to(base: str | Path | None) -> Iterator[None]:
    """Within the block, `load_items` without a `base_dir` reads relative paths from `base` (when not None).

    For code that reads a datalist through functions taking no base folder (the tasks' `inspect_datalist`,
    called by `mmar init --file_root`)."""
    token = _DEFAULT_BASE.set(Path(base).expanduser().resolve() if base else None)
    try:
        yield
    finally:
        _DEFAULT_BASE.reset(token)


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MMARError(f"datalist not found: {path} (set DATASET_JSON in config/environment.json or --set)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MMARError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    if not isinstance(data, dict):
        raise MMARError(f"{path}: a datalist is a JSON object with lists such as 'training' and 'validation'")
    return data


def load_items(
    path: str | Path,
    list_key: str,
    *,
    base_dir: str | Path | None = None,
    image_key: str = "image",
    label_key: str = "label",
    require_label: bool = True,
    check_files: bool = True,
) -> list[dict[str, Any]]:
    """The items of one list of a datalist, with absolute paths, checked.

    Extra fields of an item are kept (e.g. a case id), paths only in the image/label keys are resolved.
    """
    path = Path(path).resolve()
    data = load_json(path)
    if list_key not in data:
        present = ", ".join(k for k, v in data.items() if k not in NOT_ITEM_LISTS and _is_item_list(v)) or "none"
        raise MMARError(f"{path}: no list '{list_key}' (lists present: {present})")
    items = data[list_key]
    if not isinstance(items, list):
        raise MMARError(f"{path}: '{list_key}' must be a list of items")
    if not items:
        raise MMARError(f"{path}: '{list_key}' is empty")
    base = Path(base_dir).resolve() if base_dir else _DEFAULT_BASE.get()
    hint = "" if base else OTHER_ROOT_HINT
    base = base or path.parent
    if check_files and not base.is_dir():
        raise MMARError(f"{path}: the base folder of its relative paths does not exist: {base} "
                        "(--file_root, image_base_dir or DATA_ROOT)")
    return [
        _check_item(item, f"{path}: {list_key}[{index}]", base, image_key, label_key, require_label, check_files, hint)
        for index, item in enumerate(items)
    ]


def _check_item(item, where, base, image_key, label_key, require_label, check_files, hint="") -> dict[str, Any]:
    if isinstance(item, str):  # inference lists may be plain file names
        item = {image_key: item}
    if not isinstance(item, dict):
        raise MMARError(f"{where}: an item must be an object like {{\"{image_key}\": ..., \"{label_key}\": ...}}")
    if image_key not in item:
        raise MMARError(f"{where}: missing '{image_key}'")
    if require_label and label_key not in item:
        raise MMARError(f"{where}: missing '{label_key}'")
    checked = dict(item)
    checked[image_key] = _resolve(item[image_key], f"{where}.{image_key}", base, check_files, hint)
    if label_key in item and isinstance(item[label_key], (str, list)) and _looks_like_files(item[label_key]):
        checked[label_key] = _resolve(item[label_key], f"{where}.{label_key}", base, check_files, hint)
        if check_files:
            check_label_aligned(checked, image_key, label_key, where)
    return checked


def _is_item_list(value: Any) -> bool:
    """A list of items (objects, or file names for inference), not a list of numbers like label_format.

    Item lists may be empty."""
    return isinstance(value, list) and all(isinstance(v, (dict, str)) for v in value)


def _looks_like_files(value: Any) -> bool:
    # A classification label is a number or a list of numbers, quoted or not ("1" is the class 1, as Clara's
    # datalists often write it); a segmentation label is a file (or channel files).
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) and label_number(v) is None for v in value)
    return isinstance(value, str) and label_number(value) is None


def _resolve(value: Any, where: str, base: Path, check_files: bool, hint: str = ""):
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise MMARError(f"{where}: must be a file name or a non-empty list of file names")
        files = [_resolve(v, where, base, check_files, hint) for v in value]
        return files if len(files) > 1 else files[0]
    if not isinstance(value, str) or not value:
        raise MMARError(f"{where}: must be a file name, got {value!r}")
    path = Path(value).expanduser()
    relative = not path.is_absolute()
    path = base / path if relative else path
    if check_files and not path.is_file():
        raise MMARError(f"{where}: file not found: {path}" + (f" ({hint})" if hint and relative else ""))
    return str(path)


def check_channels_aligned(item: dict[str, Any], key: str, where: str) -> None:
    """Channel files must share the grid: same shape and affine (read from headers only)."""
    files = item.get(key)
    if not isinstance(files, list) or len(files) < 2:
        return
    import nibabel as nib

    reference = None
    for name in files:
        try:
            header = nib.load(name)
        except Exception as error:  # nibabel raises many types for unreadable files
            raise MMARError(f"{where}: cannot read {name}: {error}") from None
        grid = (header.shape[:3], header.affine)
        if reference is None:
            reference = (name, grid)
        elif grid[0] != reference[1][0] or not same_grid(grid[1], reference[1][1]):
            raise MMARError(
                f"{where}: channel {name} (shape {grid[0]}) is not aligned with {reference[0]} "
                f"(shape {reference[1][0]}); channels must share shape and affine"
            )


def same_grid(affine_a: Any, affine_b: Any) -> bool:
    """Whether two voxel -> world affines describe one grid. Both are spatial (4x4 for 3D): a one-hot label's
    channel axis is not in its affine, so it compares like an index label."""
    import numpy as np

    def as_array(affine: Any):
        affine = affine.detach().cpu() if hasattr(affine, "detach") else affine  # a MetaTensor's, on any device
        return np.asarray(affine, dtype=float)

    a, b = as_array(affine_a), as_array(affine_b)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0.0, atol=AFFINE_TOLERANCE))


def describe_grid(affine: Any) -> str:
    """An affine for a person: axis directions (nibabel's codes, RAS+), voxel size and the first voxel."""
    import nibabel as nib
    import numpy as np

    matrix = np.asarray(affine, dtype=float)[:4, :4]
    axes = "".join(str(code) for code in nib.orientations.aff2axcodes(matrix))
    spacing = "x".join(f"{v:g}" for v in np.round(np.linalg.norm(matrix[:3, :3], axis=0), 4))
    origin = ", ".join(f"{v:g}" for v in np.round(matrix[:3, 3], 3))
    return f"axes {axes}, voxels {spacing} mm, first voxel at ({origin})"


def check_label_aligned(item: dict[str, Any], image_key: str, label_key: str, where: str) -> None:
    """The label file lies on the image's grid (affines from the headers only, no voxel data read).

    A one-hot label (one channel per class, 4D) is compared by its spatial affine. Files nibabel cannot
    read are left to the loader, which names them, and to SegmentationCased, which checks the loaded pair.
    """
    image, label = item.get(image_key), item.get(label_key)
    image = image[0] if isinstance(image, list) else image  # channels share the grid (check_channels_aligned)
    label = label[0] if isinstance(label, list) else label
    if not isinstance(image, str) or not isinstance(label, str):
        return
    import nibabel as nib

    try:
        image_affine, label_affine = nib.load(image).affine, nib.load(label).affine
    except Exception:  # not a format nibabel reads, or unreadable: the loader reports it with its cause
        return
    if not same_grid(image_affine, label_affine):
        raise MMARError(grid_mismatch(image, image_affine, label, label_affine, where))


def grid_mismatch(image: str, image_affine: Any, label: str, label_affine: Any, where: str = "") -> str:
    """The message for a label that is not on its image's grid (shared by the datalist and the per-case check)."""
    return (f"{where + ': ' if where else ''}grid mismatch: label {label} is not on the grid of image {image} "
            f"(image: {describe_grid(image_affine)}; label: {describe_grid(label_affine)}); its voxels would "
            "pair with the wrong image voxels. Resample the label onto the image's grid (e.g. with the tool "
            "that made it), or fix its header")
