"""Generated Siemens mosaics: tiles + a CSA2 image header, written with pydicom (no scanner data needed).

Each tile k of volume v holds 1000*v + 50*k + x + 2*y (x: column, y: row inside the tile), so a flipped,
transposed or re-ordered slice shows in the voxels. `expected_geometry` gives the grid the construction
implies, independently of the converter under test.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# (row cosines, column cosines, Siemens CSA SliceNormalVector) per plane; sagittal as Siemens stores it:
# the CSA normal points against row x column (R>>L), the case dcm2niix handles separately
PLANES = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 0.9961947, -0.0871557), (0.0, 0.0871557, 0.9961947)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),
}


def csa2_header(tags: dict[str, tuple[str, list]]) -> bytes:
    """Encode {name: (VR, values)} as a Siemens CSA2 ('SV10') header, the layout nibabel and dcm2niix read."""
    out = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(tags), 77)]
    for name, (vr, values) in tags.items():
        out.append(struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 0, len(values), 77))
        for value in values:
            text = (f"{value:.8f}" if isinstance(value, float) else str(value)).encode() + b"\x00"
            out.append(struct.pack("<4i", len(text), len(text), 77, len(text)))
            out.append(text + b"\x00" * (-len(text) % 4))
    return b"".join(out)


def acquisition_order(slices: int, order: str) -> list[int]:
    """Slice indices in the order they were acquired."""
    if order == "asc":
        return list(range(slices))
    if order == "desc":
        return list(reversed(range(slices)))
    if order == "int":  # Siemens interleaved: odd counts start at 0, even counts at 1
        start = 0 if slices % 2 else 1
        return list(range(start, slices, 2)) + list(range(1 - start, slices, 2))
    raise ValueError(order)


def slice_times_ms(slices: int, order: str, tr_ms: float) -> list[float]:
    times = [0.0] * slices
    for rank, index in enumerate(acquisition_order(slices, order)):
        times[index] = rank * tr_ms / slices
    return times


def tile_values(slices: int, rows: int, cols: int, volume: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    return np.stack([1000 * volume + 50 * k + x + 2 * y for k in range(slices)]).astype(np.uint16)


def make_mosaic_series(folder: Path, slices: int = 35, plane: str = "axial", order: str = "asc",
                       volumes: int = 2, tile: tuple[int, int] = (8, 6), spacing=(3.25, 3.0), dz: float = 3.6,
                       tr_ms: float = 2000.0, first_position=(-100.0, -80.0, -40.0),
                       diffusion: list | None = None) -> list[Path]:
    """Write `volumes` mosaic files of `slices` tiles each (tile = rows, cols); return their paths.

    diffusion: per volume (b-value, gradient direction in LPS) for the CSA B_value and
    DiffusionGradientDirection fields (a DWI series)."""
    row, col, normal = (np.array(v) for v in PLANES[plane])
    tile_rows, tile_cols = tile
    side = math.ceil(math.sqrt(slices))
    rows, cols = side * tile_rows, side * tile_cols
    dx, dy = spacing[1], spacing[0]  # PixelSpacing is (between rows, between columns)
    first = np.array(first_position)
    corner = first - row * dx * (cols - tile_cols) / 2 - col * dy * (rows - tile_rows) / 2
    fields = {
        "NumberOfImagesInMosaic": ("US", [slices]),
        "SliceNormalVector": ("FD", [float(v) for v in normal]),
        "MosaicRefAcqTimes": ("FD", [float(t) for t in slice_times_ms(slices, order, tr_ms)]),
    }
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in range(volumes):
        image = np.zeros((rows, cols), np.uint16)
        tiles = tile_values(slices, tile_rows, tile_cols, v)
        for k in range(slices):
            r0, c0 = (k // side) * tile_rows, (k % side) * tile_cols
            image[r0:r0 + tile_rows, c0:c0 + tile_cols] = tiles[k]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"mosaic_{volumes - v:03d}.dcm"  # names against the volume order
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\x00" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "MR", "SIEMENS", "TrioTim"
        ds.PatientName, ds.PatientID = "Mosaic^Test", "MOSAIC1"
        ds.SeriesDescription = ds.ProtocolName = f"{plane}_{order}_{slices}sl"
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 5, v + 1, v + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
        ds.MRAcquisitionType = "2D"
        ds.ScanningSequence, ds.SequenceVariant, ds.SequenceName = "EP", "SK", "*epfid2d1_64"
        ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = f"{tr_ms:g}", "30", "76"
        ds.MagneticFieldStrength = "3"
        ds.SliceThickness, ds.SpacingBetweenSlices = "3", f"{dz:g}"
        ds.AcquisitionTime = f"1200{v:02d}.000000"
        ds.ImagePositionPatient = [f"{c:.6f}" for c in corner]
        ds.ImageOrientationPatient = [f"{c:.7f}" for c in (*row, *col)]
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.add_new((0x0029, 0x0010), "LO", "SIEMENS CSA HEADER")
        volume_fields = dict(fields)
        if diffusion is not None:
            bvalue, gradient = diffusion[v]
            volume_fields["B_value"] = ("IS", [int(bvalue)])
            if gradient is not None:
                volume_fields["DiffusionGradientDirection"] = ("FD", [float(g) for g in gradient])
            ds.SequenceName = f"*ep_b{int(bvalue)}#{v}"
        ds.add_new((0x0029, 0x1010), "OB", csa2_header(volume_fields))
        ds.PixelData = image.tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def expected_geometry(slices: int, plane: str, tile=(8, 6), spacing=(3.25, 3.0), dz: float = 3.6,
                      first_position=(-100.0, -80.0, -40.0)) -> np.ndarray:
    """The RAS affine dcm2niix writes for `make_mosaic_series` with the same arguments:
    tile k is slice k along the CSA normal, the rows flipped (the second axis against the column cosines)."""
    row, col, normal = (np.array(v) for v in PLANES[plane])
    tile_rows, tile_cols = tile
    dx, dy = spacing[1], spacing[0]
    flip = np.diag([-1.0, -1.0, 1.0])  # LPS -> RAS
    affine = np.eye(4)
    affine[:3, 0] = flip @ row * dx
    affine[:3, 1] = flip @ -col * dy
    affine[:3, 2] = flip @ normal * dz
    affine[:3, 3] = flip @ (np.array(first_position) + (tile_rows - 1) * dy * col)
    return affine


def expected_data(slices: int, volumes: int, tile=(8, 6)) -> np.ndarray:
    """NIfTI (x, y, z, t) array: tile k of volume v with its rows reversed."""
    stacks = [tile_values(slices, *tile, v)[:, ::-1, :] for v in range(volumes)]  # (z, y, x) per volume
    return np.stack(stacks).transpose(3, 2, 1, 0)


def read_ours(path: Path):
    import nibabel as nib

    image = nib.load(str(path))
    return image.affine, np.asanyarray(image.dataobj)


