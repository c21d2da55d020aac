"""Find the inputs under `-d` and, for DICOM, group files into series.

Files are grouped by SeriesInstanceUID (never by folder), then split further where one series UID holds
images that cannot share a grid (different matrix, orientation, pixel spacing, echo or image type), which
is what dcm2niix does too. Exact copies of one instance (same SOPInstanceUID) are dropped with a note.
Only headers are read here, and of them only what the converter needs (`header.read`, pydicom's
stop_before_pixels for the files it leaves); pixels are decoded later, in the worker that converts.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mmar.convert import header
from mmar.convert.dicom import SliceInfo, slices_from_header

# SOP classes / modalities that hold no image volume: reported as skipped, never as a volume.
NON_IMAGE_MODALITIES = {
    "SR": "structured report", "RTSTRUCT": "RT structure set", "RTPLAN": "RT plan", "PR": "presentation state",
    "KO": "key object selection", "DOC": "encapsulated document", "REG": "registration", "SEG": "segmentation object",
    "RTRECORD": "RT treatment record", "ECG": "waveform", "AU": "audio waveform", "HD": "hemodynamic waveform",
    "RWV": "real world value map", "FID": "fiducials", "PLAN": "plan",
}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd")
# Standard SOP classes that hold pixel data although their name lacks "Image Storage".
IMAGE_SOP_CLASSES = {"RT Dose Storage", "Parametric Map Storage", "Enhanced US Volume Storage",
                     "Ophthalmic Thickness Map Storage", "Corneal Topography Map Storage"}


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


def list_files(root: Path, suffix: str, output: Path | None = None) -> list[Path]:
    """Every regular file under `root` (for .dcm: any name, DICOM files often have no suffix).

    `output` (the -o folder, when it lies inside `root`) is never searched: its files are this converter's
    own outputs, and a re-run would convert them again, one folder deeper each time."""
    found = []
    skip = os.path.realpath(output) if output is not None else None
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (skip is None or os.path.realpath(os.path.join(folder, d)) != skip))
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


def image_suffix_hint(files: list[Path]) -> str:
    """For `no DICOM files found`: the -s that would take the ignored files, if they are images."""
    counts = {}
    for suffix in IMAGE_SUFFIXES:
        found = sum(1 for path in files if _has_suffix(path.name, suffix))
        if found:
            counts[suffix] = found
    if not counts:
        return ""
    what = ", ".join(f"{n} {suffix}" for suffix, n in counts.items())
    flags = " or ".join(f"-s {suffix}" for suffix in counts)
    return f"; {what} image file(s) among them: convert them with {flags}"


DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}


def _has_dicm_prefix(path: Path) -> bool | None:
    """Whether the file carries the DICM prefix after its 128-byte preamble; None when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return None
    return head[128:132] == b"DICM"


def _looks_like_dicom(path: Path) -> bool:
    """A DICM preamble, or a .dcm/.ima name: files without either are not reported as corrupt DICOM."""
    return path.suffix.lower() in DICOM_SUFFIXES or bool(_has_dicm_prefix(path))


def _plainly_not_dicom(path: Path) -> bool:
    """No DICM prefix and no DICOM name: pydicom's dcmread (force=False) would raise InvalidDicomError and
    `_looks_like_dicom` say no, so the file is ignored; told here without importing pydicom (NIfTI ground
    truths, JSON, notes beside the DICOM files). An unreadable file is left to pydicom, which words it."""
    return path.suffix.lower() not in DICOM_SUFFIXES and _has_dicm_prefix(path) is False


def read_header(root: Path, path: Path) -> tuple:
    """One file's header -> what it is, as plain data:
    ("ignored",) | ("skipped", Skipped, lost, unreadable uid or None) | ("non_image", uid, kind, rel)
    | ("image", uid, [SliceInfo], (SOPInstanceUID, SeriesNumber, SeriesDescription)).

    The plain image file (little endian, a whole header, the values as expected) is read by `header.read`,
    which decodes only the elements the converter needs; anything else by pydicom (`read_header_pydicom`),
    which also words what is wrong with a file."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    fast = header.read(path, size) if size else None
    if fast is not None:
        ds, header_end = fast
        modality = str(ds.get("Modality", "")).upper()
        if "Rows" in ds and "Columns" in ds and modality not in NON_IMAGE_MODALITIES:
            try:
                infos = slices_from_header(ds, path, header_end)
            except ValueError as error:
                rel = path.relative_to(root)
                return ("skipped", Skipped(str(rel), f"unusable image header: {error}", failed=True), False, None)
            ident = (str(ds.get("SOPInstanceUID", "")), str(ds.get("SeriesNumber", "") or ""),
                     str(ds.get("SeriesDescription", "") or "").strip())
            return ("image", str(ds.get("SeriesInstanceUID", "")), infos, ident)
    elif _plainly_not_dicom(path):
        return ("ignored",)
    return read_header_pydicom(root, path)


def read_header_pydicom(root: Path, path: Path) -> tuple:
    """`read_header` by pydicom: every file the fast path does not take (and the tests' reference)."""
    pydicom = header.import_pydicom()
    from pydicom.errors import InvalidDicomError

    rel = path.relative_to(root)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        if _looks_like_dicom(path):
            item = Skipped(str(rel), "not a readable DICOM file (no DICOM header)", failed=True)
            return ("skipped", item, True, None)
        return ("ignored",)
    except Exception as error:  # truncated or corrupt header: name the file, go on with the rest
        return ("skipped", Skipped(str(rel), f"corrupt or truncated DICOM file: {error}", failed=True), True, None)
    size = path.stat().st_size
    # first: reading values loses the offsets
    header_end = _header_end(ds)
    after_header = _bytes_after_header(ds, size)
    cut_short = after_header is not None and after_header < 0
    uid = str(ds.get("SeriesInstanceUID", ""))
    if "Rows" not in ds or "Columns" not in ds or str(ds.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
        kind = _non_image_kind(ds, cut_short)
        if kind is not None:
            return ("non_image", uid, kind, rel)
        return ("skipped", Skipped(str(rel), _why_no_image_header(ds, path), failed=True), False, uid)
    if after_header is not None and after_header < 8:  # an image header, and the file ends with it
        return ("skipped", Skipped(str(rel), f"image slice cannot be read: the file ends after {size} bytes, "
                                   "before its pixel data: truncated", failed=True), False, uid)
    try:
        infos = slices_from_header(ds, path, header_end)
    except ValueError as error:
        return ("skipped", Skipped(str(rel), f"unusable image header: {error}", failed=True), False, None)
    ident = (str(ds.get("SOPInstanceUID", "")), str(ds.get("SeriesNumber", "") or ""),
             str(ds.get("SeriesDescription", "") or "").strip())
    return ("image", uid, infos, ident)


def scan_dicom(root: Path, files: list[Path]) -> tuple[list[Series], list[Skipped], int]:
    """Read the headers of `files`; return (series, skipped/failed items, number of non-DICOM files ignored).

    In this process: reading headers in worker processes was measured slower (666 files: the SliceInfo
    records cost more to send back than the reading saves). Only plain slice records are kept per file
    (no Dataset), so memory grows by ~2 KB a file."""
    groups: dict[tuple, list[tuple[SliceInfo, tuple]]] = defaultdict(list)
    skipped: list[Skipped] = []
    ignored = 0
    non_image: dict[tuple[str, str], list[Path]] = defaultdict(list)
    # image files that cannot be read: by series UID, or by folder where the UID is lost with the header
    unreadable: dict[str, list[Path]] = defaultdict(list)
    lost: list[Path] = []
    for path in files:
        outcome = read_header(root, path)
        kind = outcome[0]
        if kind == "ignored":
            ignored += 1
        elif kind == "skipped":
            _, item, is_lost, uid = outcome
            skipped.append(item)
            if is_lost:
                lost.append(path.relative_to(root))
            elif uid is not None:
                unreadable[uid].append(path.relative_to(root))
        elif kind == "non_image":
            _, uid, what, rel = outcome
            non_image[(uid, what)].append(rel)
        else:
            _, uid, infos, ident = outcome
            for info in infos:
                groups[(uid, info.grid_key)].append((info, ident))

    for (uid, kind), paths in sorted(non_image.items()):
        what = paths[0].parent.as_posix() + (f" ({len(paths)} files)" if len(paths) > 1 else f"/{paths[0].name}")
        skipped.append(Skipped(what, f"not an image: {kind} (nothing to convert)", failed=False))

    # a series UID that no image has is lost (absent, or itself cut short): the folder is all that is left
    for uid in [uid for uid in unreadable if uid not in {key[0] for key in groups}]:
        lost.extend(unreadable.pop(uid))
    lost_in_folder: dict[Path, list[Path]] = defaultdict(list)
    for rel in lost:
        lost_in_folder[rel.parent].append(rel)
    series: list[Series] = []
    parts_per_uid: dict[str, int] = defaultdict(int)
    for (uid, _key), members in groups.items():
        parts_per_uid[uid] += 1
    seen_part: dict[str, int] = defaultdict(int)
    for (uid, _key), members in sorted(groups.items(), key=lambda item: (item[0][0], min(str(m[0].path) for m in item[1]))):
        members.sort(key=lambda m: (str(m[0].path), m[0].frame))
        notes = []
        unique, seen_sop = [], set()
        for info, ident in members:
            sop = (ident[0] or str(info.path), info.frame)
            if sop in seen_sop:
                continue
            seen_sop.add(sop)
            unique.append(info)
        if len(unique) < len(members):
            notes.append(f"{len(members) - len(unique)} duplicate instance(s) (same SOPInstanceUID) ignored")
        first_ident = members[0][1]
        part = 0
        if parts_per_uid[uid] > 1:
            seen_part[uid] += 1
            part = seen_part[uid]
            notes.append(f"series UID holds images on {parts_per_uid[uid]} different grids: split into parts")
        found = Series(
            uid=uid,
            number=first_ident[1],
            description=first_ident[2],
            folder=unique[0].path.parent.relative_to(root),
            slices=unique,
            notes=notes,
            part=part,
        )
        missing = _unreadable_members(found, root, unreadable, lost_in_folder)
        if missing:  # converting the rest would fill the gap by interpolation: a volume that looks right
            skipped.append(Skipped(found.label, f"not converted: {missing}", failed=True))
            continue
        series.append(found)
    return series, skipped, ignored


def _unreadable_members(series: Series, root: Path, by_uid: dict[str, list[Path]],
                        lost_in_folder: dict[Path, list[Path]]) -> str:
    """Why `series` cannot be complete ('' if nothing says so): image files of it that cannot be read, or
    unreadable files beside its images whose series UID was lost with the rest of their header."""
    if series.uid in by_uid:
        names = [rel.as_posix() for rel in by_uid[series.uid]]
        return f"{len(names)} of its image file(s) cannot be read ({_some(names)})"
    folders = {info.path.parent.relative_to(root) for info in series.slices}
    lost = [rel.as_posix() for folder in sorted(folders) for rel in lost_in_folder.get(folder, [])]
    if lost:
        return f"{_some(lost)} beside its images cannot be read and may be slices of it (their series UID is lost)"
    return ""


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _sop_class(ds):
    """The SOP Class UID of a dataset, from the data set or (DICOMDIR, cut-short files) its file meta."""
    sop = ds.get("SOPClassUID")
    if sop is None:
        sop = getattr(ds, "file_meta", None) and ds.file_meta.get("MediaStorageSOPClassUID")
    return sop or None


def _non_image_kind(ds, cut_short: bool) -> str | None:
    """What a file without an image header is, if it is truly not an image (an SR, a DICOMDIR, a private
    non-image object such as Siemens' CSA files); None when it is an image whose header cannot be read."""
    modality = str(ds.get("Modality", "")).upper()
    if modality in NON_IMAGE_MODALITIES:
        return NON_IMAGE_MODALITIES[modality]
    sop = _sop_class(ds)
    if sop is None:  # no SOP class at all: the file ends before the data set begins
        return None
    if sop.type == "SOP Class":  # a standard class: its name says whether it holds pixels
        if "Image Storage" in sop.name or sop.name in IMAGE_SOP_CLASSES:
            return None
        return "DICOMDIR (media directory)" if sop.name == "Media Storage Directory Storage" else sop.name
    # a private class (Siemens CSA non-image files...): no image header is normal for it, unless the file
    # is visibly cut short; an unknown UID under the DICOM root is a cut-short standard one
    if sop.is_private and sop.is_valid and not cut_short:
        return f"private SOP class {sop} without an image header"
    return None


def _why_no_image_header(ds, path: Path) -> str:
    sop = _sop_class(ds)
    what = f"{sop.name} file" if sop is not None and sop.type == "SOP Class" else "DICOM file"
    size = path.stat().st_size
    return (f"image slice cannot be read: the {what} ends after {size} bytes, before its image header "
            "(Rows/Columns): truncated or corrupt")


def _header_end(ds) -> int | None:
    """File offset just after the last element pydicom read (where Pixel Data starts), or None."""
    tags = list(ds.keys())
    if not tags:
        return None
    element = ds.get_item(tags[-1])
    length, tell = getattr(element, "length", None), getattr(element, "value_tell", None)
    if length is None or tell is None or length == 0xFFFFFFFF:
        return None
    return tell + length


def _bytes_after_header(ds, size: int) -> int | None:
    """File bytes after the last element pydicom read (stop_before_pixels): negative when the file stops
    inside that element (or holds no element at all), under 8 when not even the pixel data's element header
    can follow; None when the last element does not say where it ends.

    pydicom reads a cut-short file without error, so this is how one is told. Only raw (unread) elements
    know their place in the file: call it before reading any value from `ds`."""
    tags = list(ds.keys())
    if not tags:
        return -1
    element = ds.get_item(tags[-1])
    length, tell = getattr(element, "length", None), getattr(element, "value_tell", None)
    if length is None or tell is None or length == 0xFFFFFFFF:
        return None
    return size - (tell + length)
