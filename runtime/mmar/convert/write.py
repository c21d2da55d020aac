"""Output names and writing: stable, collision-free names; never overwrite without -f; temp file + rename."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd")


def _clean(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._")
    return text or "series"


def dicom_names(series: list, root_name: str) -> list[str]:
    """One base name per series, derived from its folder, stable for the same input, never repeated.

    folder path (relative, '/' -> '_'); where several series share a folder add `_s<SeriesNumber>`;
    where that still repeats add the first 8 hex digits of sha1(SeriesInstanceUID) (+ `_p<part>`).
    """
    def folder(s) -> str:
        rel = s.folder.as_posix()
        return _clean(root_name if rel in ("", ".") else rel.replace("/", "_"))

    names = [folder(s) for s in series]
    counts = Counter(names)
    names = [n if counts[n] == 1 else f"{n}_s{_clean(s.number or 'x')}" for n, s in zip(names, series)]
    counts = Counter(names)
    out = []
    for n, s in zip(names, series):
        if counts[n] > 1:
            n = f"{n}_{hashlib.sha1(s.uid.encode()).hexdigest()[:8]}" + (f"_p{s.part}" if s.part else "")
        out.append(n)
    assert len(set(out)) == len(out), "output names must be unique"
    return out


def image_name(path: Path, root: Path) -> str:
    """An image file keeps its relative path, without its suffix ('a/b.nii.gz' -> 'a/b')."""
    rel = path.relative_to(root).as_posix()
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd"):
        if rel.lower().endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def outputs_of(target: Path) -> list[Path]:
    """Files one result consists of (.mhd has its pixel file beside it)."""
    if target.name.lower().endswith(".mhd"):
        return [target, target.with_suffix(".raw"), target.with_suffix(".zraw")]
    return [target]


def existing(target: Path) -> list[Path]:
    return [p for p in outputs_of(target) if p.exists()]


def write_image(image, target: Path, compress: bool = True) -> None:
    """Write a SimpleITK image to `target` atomically (a crash leaves any previous file intact)."""
    import SimpleITK as sitk

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.name.lower().endswith(".mhd"):
        # header + pixel file: write both under their final names in a temp folder, then move the pixel
        # file first and the header last, so a reader never sees a header without its data.
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            sitk.WriteImage(image, str(tmpdir / target.name), compress)
            for produced in sorted(tmpdir.iterdir(), key=lambda p: p.suffix == ".mhd"):
                os.replace(produced, target.parent / produced.name)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return
    from mmar.io import atomic_path

    with atomic_path(target) as tmp:
        # .nii.gz is compressed because of its suffix; .mha honours the flag
        sitk.WriteImage(image, str(tmp), compress)
