"""Find the inputs under `-d` and, for DICOM, group files into series.

Files are grouped by SeriesInstanceUID (never by folder), then split further where one series UID holds
images that cannot share a grid (different matrix, orientation, pixel spacing, echo or image type), which
is what dcm2niix does too. Exact copies of one instance (same SOPInstanceUID) are dropped with a note.
Only headers are read here (stop_before_pixels); pixels are decoded later, in the worker that converts.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mmar.convert.dicom import SliceInfo, slices_from_header

# SOP classes / modalities that hold no image volume: reported as skipped, never as a volume.
NON_IMAGE_MODALITIES = {
    "SR": "structured report", "RTSTRUCT": "RT structure set", "RTPLAN": "RT plan", "PR": "presentation state",
    "KO": "key object selection", "DOC": "encapsulated document", "REG": "registration", "SEG": "segmentation object",
    "RTRECORD": "RT treatment record", "ECG": "waveform", "AU": "audio waveform", "HD": "hemodynamic waveform",
    "RWV": "real world value map", "FID": "fiducials", "PLAN": "plan",
}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd")


@dataclass
class Series:
    """One convertible group of DICOM images (a 3D or 4D volume)."""

    uid: str
    number: str
    description: str
    folder: Path  # folder (relative to the input root) holding the first file; used for the output name
    slices: list[SliceInfo]
    notes: list[str] = field(default_factory=list)
    part: int = 0  # >0 when one SeriesInstanceUID had to be split into several volumes

    @property
    def label(self) -> str:
        folder = self.folder.as_posix() if str(self.folder) not in ("", ".") else "."
        desc = f" '{self.description}'" if self.description else ""
        part = f" part {self.part}" if self.part else ""
        return f"{folder} series {self.number or '?'}{desc}{part}"


@dataclass
class Skipped:
    what: str  # the file or series
    reason: str
    failed: bool  # True: counts as a failure (corrupt input); False: nothing to convert (e.g. an SR)


def list_files(root: Path, suffix: str) -> list[Path]:
    """Every regular file under `root` (for .dcm: any name, DICOM files often have no suffix)."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            if suffix == ".dcm" or _has_suffix(name, suffix):
                found.append(Path(folder) / name)
    return found


def _has_suffix(name: str, suffix: str) -> bool:
    lower = name.lower()
    if suffix == ".nii":  # .nii must not also pick up .nii.gz
        return lower.endswith(".nii")
    return lower.endswith(suffix)


def _looks_like_dicom(path: Path) -> bool:
    """A DICM preamble, or a .dcm/.ima name: files without either are not reported as corrupt DICOM."""
    if path.suffix.lower() in {".dcm", ".dicom", ".ima"}:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def scan_dicom(root: Path, files: list[Path]) -> tuple[list[Series], list[Skipped], int]:
    """Read the headers of `files`; return (series, skipped/failed items, number of non-DICOM files ignored)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[tuple, list[tuple[SliceInfo, object]]] = defaultdict(list)
    skipped: list[Skipped] = []
    ignored = 0
    non_image: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path in files:
        rel = path.relative_to(root)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            if _looks_like_dicom(path):
                skipped.append(Skipped(str(rel), "not a readable DICOM file (no DICOM header)", failed=True))
            else:
                ignored += 1
            continue
        except Exception as error:  # truncated or corrupt header: name the file, go on with the rest
            skipped.append(Skipped(str(rel), f"corrupt or truncated DICOM file: {error}", failed=True))
            continue
        modality = str(ds.get("Modality", "")).upper()
        sop_name = getattr(ds.get("SOPClassUID"), "name", "") or ""
        if modality in NON_IMAGE_MODALITIES or "Rows" not in ds or "Columns" not in ds:
            kind = NON_IMAGE_MODALITIES.get(modality) or sop_name or "no pixel data"
            non_image[(str(ds.get("SeriesInstanceUID", "")), kind)].append(rel)
            continue
        try:
            infos = slices_from_header(ds, path)
        except ValueError as error:
            skipped.append(Skipped(str(rel), f"unusable image header: {error}", failed=True))
            continue
        for info in infos:
            groups[(str(ds.get("SeriesInstanceUID", "")), info.grid_key)].append((info, ds))

    for (uid, kind), paths in sorted(non_image.items()):
        what = paths[0].parent.as_posix() + (f" ({len(paths)} files)" if len(paths) > 1 else f"/{paths[0].name}")
        skipped.append(Skipped(what, f"not an image: {kind} (nothing to convert)", failed=False))

    series: list[Series] = []
    parts_per_uid: dict[str, int] = defaultdict(int)
    for (uid, _key), members in groups.items():
        parts_per_uid[uid] += 1
    seen_part: dict[str, int] = defaultdict(int)
    for (uid, _key), members in sorted(groups.items(), key=lambda item: (item[0][0], min(str(m[0].path) for m in item[1]))):
        members.sort(key=lambda m: (str(m[0].path), m[0].frame))
        notes = []
        unique, seen_sop = [], set()
        for info, ds in members:
            sop = (str(ds.get("SOPInstanceUID", "")) or str(info.path), info.frame)
            if sop in seen_sop:
                continue
            seen_sop.add(sop)
            unique.append(info)
        if len(unique) < len(members):
            notes.append(f"{len(members) - len(unique)} duplicate instance(s) (same SOPInstanceUID) ignored")
        first_ds = members[0][1]
        part = 0
        if parts_per_uid[uid] > 1:
            seen_part[uid] += 1
            part = seen_part[uid]
            notes.append(f"series UID holds images on {parts_per_uid[uid]} different grids: split into parts")
        series.append(
            Series(
                uid=uid,
                number=str(first_ds.get("SeriesNumber", "") or ""),
                description=str(first_ds.get("SeriesDescription", "") or "").strip(),
                folder=unique[0].path.parent.relative_to(root),
                slices=unique,
                notes=notes,
                part=part,
            )
        )
    return series, skipped, ignored
