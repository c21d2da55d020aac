"""The pulled series as a datalist list, written into FILE atomically (its other lists kept).

Each entry: {"image": NIfTI, "dicom": the source series folder, "StudyInstanceUID", "SeriesInstanceUID"}
with paths relative to the datalist's folder, plus "label" when the labels folder holds a mask for the
case. A label matches a case by the NIfTI file's name (the SeriesInstanceUID, `_<k>` for a split series):
LABELS/<StudyInstanceUID>/<name>.nii[.gz] (the layout pull writes images in), else LABELS/<name>.nii[.gz].
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmar.io import write_json
from mmar.pacs.client import PacsError

LABEL_SUFFIXES = (".nii.gz", ".nii")


def relative(path: Path, datalist: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), datalist.resolve().parent)).as_posix()


def find_label(labels_dir: Path, study_uid: str, image: Path) -> Path | None:
    name = next((image.name[: -len(s)] for s in LABEL_SUFFIXES if image.name.endswith(s)), image.stem)
    for folder in (labels_dir / study_uid, labels_dir):
        for suffix in LABEL_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def entry(image: Path, series_dir: Path, study_uid: str, series_uid: str, datalist: Path,
          label: Path | None = None) -> dict[str, Any]:
    item = {"image": relative(image, datalist), "dicom": relative(series_dir, datalist),
            "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
    if label is not None:
        item["label"] = relative(label, datalist)
    return item


def read_existing(datalist: Path) -> dict[str, Any]:
    """The datalist's lists ({} when there is no file yet); PacsError naming it when it is not a JSON object.
    Called before any download too, so that a pull never retrieves what it could not list afterwards."""
    if not datalist.exists():
        return {}
    try:
        data = json.loads(datalist.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PacsError(f"--datalist {datalist}: cannot read it as JSON ({error}); not replaced") from None
    if not isinstance(data, dict):
        raise PacsError(f"--datalist {datalist}: a datalist is a JSON object of lists; not replaced")
    return data


def write_list(datalist: Path, key: str, entries: list[dict[str, Any]]) -> None:
    """Replace the list `key` of the datalist (created if absent); a datalist that cannot be read is an
    error before anything changes."""
    data = read_existing(datalist)
    data[key] = entries
    write_json(datalist, data)
