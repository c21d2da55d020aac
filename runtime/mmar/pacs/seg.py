"""A predicted label volume (NIfTI) -> a DICOM Segmentation of its source series (highdicom).

Geometry is taken from both files, never from a voxel order: every pixel of every source slice is placed
in patient coordinates (ImagePositionPatient, ImageOrientationPatient, PixelSpacing; DICOM's LPS), turned
into the NIfTI's RAS world and through the inverse of its affine into a voxel index, and takes that
voxel's label (nearest voxel; outside the volume: background). One frame per source slice and segment
then carries exactly the source slice's plane position, and the SEG shares the source's Frame of
Reference. Where the two grids coincide (a prediction of the series `mmar pull` converted) the mapping
is exact; otherwise it is a nearest-neighbour resampling, said in a warning.

One segment per foreground class, named from the datalist's `labels` ({"1": "liver", ...}, as MSD
datalists hold them), else "class <k>". The UIDs are derived from the source series and the mask's
content, so the same prediction gives the same SOPInstanceUID and `mmar push` stores it only once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmar.errors import MMARError
from mmar.pacs.query import check_file_uids

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# type 2 attributes of the patient and study modules a SEG copies from its source (highdicom reads them)
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
GRID_TOLERANCE = 0.05  # voxels: farther from a voxel centre than this, the grids differ


@dataclass
class Placed:
    labels: np.ndarray  # (slices, rows, columns): the mask's label at every source pixel
    exact: bool  # every source pixel sat on a voxel centre of the mask


def source_files(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*.dcm") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise MMARError(f"{folder}: no DICOM files (the source series of a datalist entry's 'dicom')")
    return files


def _read(path: Path, **kwargs):
    import pydicom

    try:
        return pydicom.dcmread(path, **kwargs)
    except Exception as error:  # noqa: BLE001 - pydicom raises several types for a bad file
        raise MMARError(f"{path}: not a readable DICOM file ({type(error).__name__})") from None


def check_source_uids(folder: Path) -> None:
    """Headers only, before a model runs: every file of the source folder holds DICOM UIDs (Study, Series,
    SOP Instance, SOP Class, Frame of Reference: a SEG copies or references them, `mmar push` puts them in
    URLs), all of one study and one series. The files came from a server; what is in them is checked here,
    not trusted because a query answer was."""
    studies, series = set(), set()
    for path in source_files(folder):
        ds = _read(path, stop_before_pixels=True)
        check_file_uids(ds, str(path))
        studies.add(str(ds.StudyInstanceUID))
        series.add(str(ds.SeriesInstanceUID))
    if len(studies) > 1 or len(series) > 1:
        raise MMARError(f"{folder}: holds {len(series)} series of {len(studies)} studies; a source folder must hold "
                        "one series")


def read_source_series(folder: Path) -> list:
    """The image instances of one series folder (pydicom datasets), checked to be one single-frame series
    whose UIDs are DICOM UIDs."""
    datasets = []
    for path in source_files(folder):
        ds = _read(path)
        check_file_uids(ds, str(path))
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            for keyword in TYPE_2_COPIED:  # may be empty but present: anonymizers often drop them
                if keyword not in ds:
                    setattr(ds, keyword, "")
            datasets.append(ds)
    if not datasets:
        raise MMARError(f"{folder}: no image instances with a position (ImagePositionPatient)")
    _fill_slice_thickness(datasets)
    series = {ds.SeriesInstanceUID for ds in datasets}
    studies = {ds.StudyInstanceUID for ds in datasets}
    if len(series) > 1 or len(studies) > 1:
        raise MMARError(f"{folder}: holds {len(series)} series of {len(studies)} studies; a source folder must hold one series")
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise MMARError(f"{folder}: multi-frame source images are not supported (single-frame series only)")
    frames_of_reference = {getattr(ds, "FrameOfReferenceUID", None) or None for ds in datasets}
    if frames_of_reference == {None}:
        raise MMARError(f"{folder}: the series has no FrameOfReferenceUID (removed by an anonymizer?); a DICOM SEG "
                        "must share its source's Frame of Reference, so none can be made for it")
    if len(frames_of_reference) != 1:
        raise MMARError(f"{folder}: the series' instances do not share one FrameOfReferenceUID")
    return datasets


def _fill_slice_thickness(datasets: list) -> None:
    """SliceThickness may be empty in MR (type 2) or dropped; the SEG's pixel measures need a number: the
    distance between adjacent slice positions (1 mm for a single slice). In memory only."""
    if all(str(getattr(ds, "SliceThickness", "") or "").strip() for ds in datasets):
        return
    orientation = np.asarray(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.unique(np.round([float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))) for ds in datasets], 4))
    gap = float(np.median(np.diff(along))) if len(along) > 1 else 1.0
    for ds in datasets:
        if not str(getattr(ds, "SliceThickness", "") or "").strip():
            ds.SliceThickness = round(gap, 6)


def pixel_world_ras(ds) -> np.ndarray:
    """RAS world coordinates of every pixel centre of a single-frame slice: (rows, columns, 3)."""
    position = np.asarray(ds.ImagePositionPatient, float)
    orientation = np.asarray(ds.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    along_row, along_column = orientation[:3], orientation[3:]  # direction of increasing column, row index
    rows, columns = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
    lps = (position + rows[..., None] * row_spacing * along_column + columns[..., None] * column_spacing * along_row)
    return lps @ LPS_TO_RAS.T


def place_on_source(mask: np.ndarray, affine: np.ndarray, sources: list) -> Placed:
    """The mask's label at every pixel of every source slice (in the order of `sources`)."""
    inverse = np.linalg.inv(np.asarray(affine, float))
    out = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), dtype=mask.dtype)
    exact = True
    for index, ds in enumerate(sources):
        if (int(ds.Rows), int(ds.Columns)) != out.shape[1:]:
            raise MMARError(f"series {ds.SeriesInstanceUID}: its slices differ in size ({ds.Rows}x{ds.Columns} "
                            f"vs {out.shape[1]}x{out.shape[2]})")
        world = pixel_world_ras(ds)
        voxel = world @ inverse[:3, :3].T + inverse[:3, 3]
        nearest = np.rint(voxel).astype(np.int64)
        exact = exact and float(np.abs(voxel - nearest).max()) <= GRID_TOLERANCE
        inside = np.all((nearest >= 0) & (nearest < np.asarray(mask.shape[:3])), axis=-1)
        exact = exact and bool(inside.all())
        i, j, k = (np.where(inside, nearest[..., axis], 0) for axis in range(3))
        out[index] = np.where(inside, mask[i, j, k], 0)
    return Placed(out, exact)


def class_names(label_names: dict | None, num_classes: int | None, present: np.ndarray) -> dict[int, str]:
    """Foreground label value -> segment name: the datalist's names, else 'class <k>' for every class the
    config declares (or that the mask holds)."""
    names: dict[int, str] = {}
    for key, name in (label_names or {}).items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            continue
        if value > 0:
            names[value] = str(name)
    values = set(range(1, int(num_classes))) if num_classes else set()
    values |= {int(v) for v in np.unique(present) if v > 0}
    for value in sorted(values):
        names.setdefault(value, f"class {value}")
    return dict(sorted(names.items()))


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=list(parts))


def build_segmentation(mask_file: Path, sources: list, names_of: dict | None, num_classes: int | None, *,
                       algorithm: str, version: str, log=print):
    """The DICOM Segmentation (highdicom) of `mask_file` over the source series `sources`."""
    import highdicom as hd
    import nibabel as nib
    from pydicom.sr.codedict import codes

    image = nib.load(str(mask_file))
    mask = np.asarray(image.dataobj)
    if mask.ndim == 4 and mask.shape[3] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise MMARError(f"{mask_file}: a label volume must be 3-D, got shape {mask.shape}")
    if not np.all(np.equal(np.mod(mask, 1), 0)) or mask.min() < 0:
        raise MMARError(f"{mask_file}: not a label volume (non-integer or negative values)")
    mask = mask.astype(np.int32)
    placed = place_on_source(mask, image.affine, sources)
    if not placed.exact:
        log(f"warning: {mask_file.name} is not on the grid of series {sources[0].SeriesInstanceUID}: "
            "nearest-neighbour resampled onto the source slices")
    names = class_names(names_of, num_classes, placed.labels)
    values = list(names)
    pixels = np.stack([placed.labels == value for value in values], axis=-1).astype(np.uint8)
    family = codes.cid7162.ArtificialIntelligence
    algorithm_id = hd.AlgorithmIdentificationSequence(name=algorithm[:64] or "mmar", family=family, version=version[:64])
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=names[value][:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm_id)
        for number, value in enumerate(values, 1)
    ]
    series_uid = sources[0].SeriesInstanceUID
    digest = hashlib.sha256(pixels.tobytes() + repr(sorted(names.items())).encode()).hexdigest()
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid(series_uid, digest, "mmar-seg-series"), series_number=9000,
        sop_instance_uid=_uid(series_uid, digest, "mmar-seg-instance"), instance_number=1,
        manufacturer="mmar", manufacturer_model_name=algorithm[:64] or "mmar", software_versions=version[:64],
        device_serial_number="0", series_description=f"mmar segmentation ({algorithm})"[:64],
        content_label="MMAR_SEG",
    )


def write_segmentation(dataset, target: Path) -> None:
    from mmar.io import atomic_path

    with atomic_path(target) as tmp:
        dataset.save_as(tmp)
