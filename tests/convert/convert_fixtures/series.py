"""Build small multi-file DICOM series from the real files pydicom ships (pydicom.data test files).

The pixel data (raw or compressed) is kept byte for byte; only geometry and identity tags change, so a
series keeps its transfer syntax (RLE, JPEG-LS, JPEG 2000 ...). File names and InstanceNumbers are
deliberately scrambled relative to the slice order, so a converter that sorts by either gets it wrong.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid


def pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        import pytest

        pytest.skip(f"pydicom test file {name} not available")
    return Path(path)


def oblique(angle_deg: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Row and column cosines rotated about two axes: a genuinely oblique plane."""
    a, b = np.radians(angle_deg), np.radians(angle_deg / 2)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = rot_x @ rot_z
    return m[:, 0], m[:, 1]


def make_series(source: Path, folder: Path, count: int = 5, step: float = 2.5, positions=None,
                orientation=None, inplane_drift=(0.0, 0.0), series_uid: str | None = None,
                series_number: int = 7, pixel_fn=None, instance_start: int = 100) -> list[Path]:
    """Write `count` slices of `source` to `folder` along the normal; return the paths in slice order.

    positions: explicit offsets along the normal (mm) instead of k*step; inplane_drift: mm per slice
    along (row, column) cosines (gantry tilt); pixel_fn(ds, k): edit the (uncompressed) pixels of slice k.
    """
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(source)
    if orientation is None:
        iop = [float(v) for v in template.ImageOrientationPatient]
        row, col = np.array(iop[:3]), np.array(iop[3:])
    else:
        row, col = orientation
    normal = np.cross(row, col)
    origin = np.array([float(v) for v in template.ImagePositionPatient])
    offsets = list(positions) if positions is not None else [k * step for k in range(count)]
    series_uid = series_uid or generate_uid()
    paths = []
    for k, offset in enumerate(offsets):
        ds = pydicom.dcmread(source)
        position = origin + offset * normal + k * (inplane_drift[0] * row + inplane_drift[1] * col)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.SliceLocation = f"{offset:.4f}"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = instance_start + (count - k) * 3 % (count + 1)  # not in slice order
        if pixel_fn is not None:
            pixel_fn(ds, k)
        # names in reverse-ish order of position, so sorting by name is wrong too
        path = folder / f"img{(count - k) * 7919 % 1000:04d}_{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def set_pixels(ds, array: np.ndarray) -> None:
    """Replace the pixels of an uncompressed dataset (dtype follows BitsAllocated/PixelRepresentation)."""
    dtype = np.dtype(f"{'i' if int(ds.PixelRepresentation) else 'u'}{int(ds.BitsAllocated) // 8}")
    ds.PixelData = np.ascontiguousarray(array.astype(dtype)).tobytes()


def make_enhanced(source: Path, path: Path, count: int = 4, step: float = 3.0, orientation=None) -> None:
    """One Enhanced MR multi-frame file: `count` frames of `source` (each +k*50) along the normal,
    geometry only in the shared / per-frame functional groups, frames stored in reverse position order."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(source)
    frame = ds.pixel_array.astype(np.int16)
    row, col = orientation if orientation is not None else oblique()
    normal = np.cross(row, col)
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    order = list(reversed(range(count)))  # frame i holds slice order[i]
    set_pixels(ds, np.stack([frame + 50 * k for k in order]))
    ds.NumberOfFrames = count
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = ds.PixelSpacing
    measures.SliceThickness = step
    shared.PixelMeasuresSequence = Sequence([measures])
    plane = Dataset()
    plane.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
    shared.PlaneOrientationSequence = Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i, k in enumerate(order):
        item, position, content = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * step * normal]
        item.PlanePositionSequence = Sequence([position])
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        item.FrameContentSequence = Sequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        if keyword in ds:
            delattr(ds, keyword)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
