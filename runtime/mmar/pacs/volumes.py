"""A retrieved series -> NIfTI through the project's converter (`mmar convert`'s entry point, as a user runs it).

The converter names its outputs after folders, and how it does so is its own business: each series is
converted alone into a temp folder, and what it wrote is moved to OUTPUT/<StudyInstanceUID>/<SeriesInstanceUID>
<ext> (`_<k>` added where the converter splits one series into several volumes). A series already converted
and not changed since (no instance retrieved now) is not converted again.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from mmar.pacs.client import PacsError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd")
TEMP_FOLDER = re.compile(r"^\.[0-9.]+\.pull-")


def _suffix(path: Path) -> str:
    return next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), "")


def converted(study_dir: Path, series_uid: str) -> list[Path]:
    """The NIfTI files a previous pull made of this series."""
    if not study_dir.is_dir():
        return []
    found = []
    for path in study_dir.iterdir():
        suffix = _suffix(path)
        stem = path.name[: -len(suffix)] if suffix else ""
        if suffix and (stem == series_uid or re.fullmatch(re.escape(series_uid) + r"_\d+", stem)):
            found.append(path)
    return sorted(found, key=lambda p: p.name)


def remove_abandoned(output_dir: Path) -> None:
    """Temp folders of a conversion that was killed (they only ever hold half-made copies)."""
    if not output_dir.is_dir():
        return
    for study in output_dir.iterdir():
        if study.is_dir():
            for child in study.iterdir():
                if child.is_dir() and TEMP_FOLDER.match(child.name):
                    shutil.rmtree(child, ignore_errors=True)


@contextlib.contextmanager
def _no_step_result():
    """The converter reports its own step result; inside a pull that would stand in for the pull's (read by
    the operator if the pull were then killed), so it goes nowhere."""
    saved = os.environ.get("MMAR_TERMINATION_LOG")
    os.environ["MMAR_TERMINATION_LOG"] = os.devnull
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MMAR_TERMINATION_LOG", None)
        else:
            os.environ["MMAR_TERMINATION_LOG"] = saved


def convert_series(series_dir: Path, study_dir: Path, series_uid: str, *, changed: bool) -> list[Path]:
    """The series' NIfTI file(s) in study_dir, converted now unless present and `changed` is False."""
    present = converted(study_dir, series_uid)
    if present and not changed:
        return present
    from mmar.convert.cli import main as convert_main

    study_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{series_uid}.pull-", dir=study_dir))
    try:
        with _no_step_result():
            status = convert_main(["-d", str(series_dir), "-o", str(staging), "-q"])
        made = sorted((p for p in staging.rglob("*") if p.is_file() and _suffix(p)), key=lambda p: p.as_posix())
        if status != 0 or not made:
            raise PacsError(f"converting {series_dir} to NIfTI failed (see the converter's lines above)")
        if any(_suffix(p) == ".mhd" for p in made):  # not produced by the default -e .nii.gz; kept out of the way
            raise PacsError(f"converting {series_dir}: expected NIfTI files, got {[p.name for p in made]}")
        names = [f"{series_uid}{_suffix(p)}" for p in made] if len(made) == 1 else \
                [f"{series_uid}_{k}{_suffix(p)}" for k, p in enumerate(made, 1)]
        for old in present:  # the series changed on the server: its old volumes go
            if old.name not in names:
                old.unlink()
        outputs = []
        for source, name in zip(made, names):
            os.replace(source, study_dir / name)  # same file system: an atomic rename
            outputs.append(study_dir / name)
        return outputs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
