"""Read and check a Clara datalist.

    {"training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [{"image": ["t1/b.nii.gz", "t2/b.nii.gz"], "label": "labelsTr/b.nii.gz"}]}

`image` may be a list of files (channels, concatenated; spatially aligned). Relative paths are relative
to the base folder (`--file_root` > config `image_base_dir` > `DATA_ROOT` > the datalist's folder).
`label` may be absent where no ground truth is needed (inference). Every error names the datalist, the
list, the item and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmar.errors import MMARError


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
        present = ", ".join(k for k, v in data.items() if isinstance(v, list)) or "none"
        raise MMARError(f"{path}: no list '{list_key}' (lists present: {present})")
    items = data[list_key]
    if not isinstance(items, list):
        raise MMARError(f"{path}: '{list_key}' must be a list of items")
    if not items:
        raise MMARError(f"{path}: '{list_key}' is empty")
    base = Path(base_dir).resolve() if base_dir else path.parent
    return [
        _check_item(item, f"{path}: {list_key}[{index}]", base, image_key, label_key, require_label, check_files)
        for index, item in enumerate(items)
    ]


def _check_item(item, where, base, image_key, label_key, require_label, check_files) -> dict[str, Any]:
    if isinstance(item, str):  # inference lists may be plain file names
        item = {image_key: item}
    if not isinstance(item, dict):
        raise MMARError(f"{where}: an item must be an object like {{\"{image_key}\": ..., \"{label_key}\": ...}}")
    if image_key not in item:
        raise MMARError(f"{where}: missing '{image_key}'")
    if require_label and label_key not in item:
        raise MMARError(f"{where}: missing '{label_key}'")
    checked = dict(item)
    checked[image_key] = _resolve(item[image_key], f"{where}.{image_key}", base, check_files)
    if label_key in item and isinstance(item[label_key], (str, list)) and _looks_like_files(item[label_key]):
        checked[label_key] = _resolve(item[label_key], f"{where}.{label_key}", base, check_files)
    return checked


def _looks_like_files(value: Any) -> bool:
    # A classification label is a list of numbers; a segmentation label is a file (or channel files).
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _resolve(value: Any, where: str, base: Path, check_files: bool):
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise MMARError(f"{where}: must be a file name or a non-empty list of file names")
        files = [_resolve(v, where, base, check_files) for v in value]
        return files if len(files) > 1 else files[0]
    if not isinstance(value, str) or not value:
        raise MMARError(f"{where}: must be a file name, got {value!r}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if check_files and not path.is_file():
        raise MMARError(f"{where}: file not found: {path}")
    return str(path)


def check_channels_aligned(item: dict[str, Any], key: str, where: str) -> None:
    """Channel files must share the grid: same shape and affine (read from headers only)."""
    files = item.get(key)
    if not isinstance(files, list) or len(files) < 2:
        return
    import nibabel as nib
    import numpy as np

    reference = None
    for name in files:
        try:
            header = nib.load(name)
        except Exception as error:  # nibabel raises many types for unreadable files
            raise MMARError(f"{where}: cannot read {name}: {error}") from None
        grid = (header.shape[:3], header.affine)
        if reference is None:
            reference = (name, grid)
        elif grid[0] != reference[1][0] or not np.allclose(grid[1], reference[1][1], atol=1e-3):
            raise MMARError(
                f"{where}: channel {name} (shape {grid[0]}) is not aligned with {reference[0]} "
                f"(shape {reference[1][0]}); channels must share shape and affine"
            )
