"""A retrieved series -> NIfTI through the project's converter (`mmar convert`'s entry point, as a user runs it).

The converter names its outputs after folders, and how it does so is its own business: each series is
converted alone into a temp folder, and what it wrote is moved to OUTPUT/<StudyInstanceUID>/<SeriesInstanceUID>
<ext> (`_<k>` added where the converter splits one series into several volumes).

Beside them, `.<SeriesInstanceUID>.pull.json` records what they were made from: the SOPInstanceUIDs of
the series folder at conversion time, and the volume files. A series is converted again whenever that
record is missing or differs from the folder and the files now: instances added since (a pull that was
killed after retrieving them, before its conversion finished), a volume missing, a NIfTI of an older pull
with no record. The record is removed before the volumes are replaced and written (atomically) only
after they all are, so a pull killed anywhere in between leaves no record, and the next pull converts
again rather than trusting a NIfTI made of fewer instances.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from mmar.io import write_json
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


def manifest_path(study_dir: Path, series_uid: str) -> Path:
    return study_dir / f".{series_uid}.pull.json"


def instances_of(series_dir: Path) -> list[str]:
    """The SOPInstanceUIDs of the whole instances in a series folder (`<SOPInstanceUID>.dcm`; temp files,
    hidden, left out)."""
    return sorted(p.name[: -len(".dcm")] for p in series_dir.glob("*.dcm") if not p.name.startswith(".") and p.is_file())


def _read_manifest(path: Path) -> dict | None:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stale_reason(study_dir: Path, series_uid: str, instances: list[str], present: list[Path]) -> str | None:
    """Why the series' NIfTI files on disk cannot be reused (None: they were made of exactly `instances`)."""
    if not present:
        return "not converted yet"
    record = _read_manifest(manifest_path(study_dir, series_uid))
    if record is None:
        return "no record of the instances it was made from"
    made_of = record.get("instances")
    if not isinstance(made_of, list) or record.get("series") != series_uid:
        return f"{manifest_path(study_dir, series_uid).name} is not a record of this series"
    if sorted(map(str, made_of)) != instances:
        added, gone = len(set(instances) - set(made_of)), len(set(made_of) - set(instances))
        changes = ([f"{added} added"] if added else []) + ([f"{gone} gone"] if gone else [])
        return (f"made of {len(made_of)} instance(s), the series folder now holds {len(instances)} "
                f"({', '.join(changes) or 'duplicates in the record'})")
    if record.get("volumes") != [p.name for p in present]:
        return f"its volumes are not those recorded ({[p.name for p in present]} vs {record.get('volumes')})"
    return None


def convert_series(series_dir: Path, study_dir: Path, series_uid: str, log=print) -> list[Path]:
    """The series' NIfTI file(s) in study_dir: those on disk when their record says they were made of the
    instances the series folder holds now, else converted now (and the record written)."""
    instances = instances_of(series_dir)
    present = converted(study_dir, series_uid)
    why = stale_reason(study_dir, series_uid, instances, present)
    if why is None:
        return present
    if present:
        log(f"converting series {series_uid} again: {why}")
    from mmar.convert.cli import main as convert_main

    study_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifest_path(study_dir, series_uid)
    manifest.unlink(missing_ok=True)  # from here until the new record is written, nothing on disk is trusted
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
        outputs.sort(key=lambda p: p.name)
        write_json(manifest, {"series": series_uid, "instances": instances, "volumes": [p.name for p in outputs]})
        return outputs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
