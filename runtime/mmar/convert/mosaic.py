"""Siemens mosaics: one DICOM image holding all slices of a volume as tiles (fMRI, DWI, many EPI series).

The Siemens CSA image header (private tag 0029,1010) says how many tiles hold slices
(NumberOfImagesInMosaic), the slice normal (SliceNormalVector) and each slice's acquisition time
(MosaicRefAcqTimes, ms). It is parsed by `parse_csa` (nibabel's layout rules, only the
fields needed; see there why not nibabel itself).

Geometry, as dcm2niix places mosaic slices (nii_dicom.cpp, set_nii_header_x):
- tiles are read row by row, tile k is slice k: dcm2niix keeps this order on disk, so slice-timing and
  ascending/descending/interleaved acquisition stay as acquired;
- ImagePositionPatient of a mosaic is the corner of the whole mosaic; the first tile starts
  (columns - tile columns)/2 pixels along the row cosines and (rows - tile rows)/2 along the column
  cosines further;
- slice k lies k * SpacingBetweenSlices (else SliceThickness) along the CSA SliceNormalVector, which may
  point against row x column (Siemens sagittal): the third axis then follows the CSA normal.
"""

from __future__ import annotations

import math
import struct

import numpy as np

CSA_IMAGE_HEADER = (0x0029, 0x1010)


class MosaicError(ValueError):
    """A mosaic header that cannot be used (the message names the field)."""


def is_mosaic(ds) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or ())]
    return "MOSAIC" in image_type and CSA_IMAGE_HEADER in ds


# the CSA fields the converter reads; others are skipped without decoding
CSA_FIELDS = ("NumberOfImagesInMosaic", "SliceNormalVector", "MosaicRefAcqTimes", "B_value",
              "DiffusionGradientDirection")


def csa_image_tags(ds, wanted: tuple[str, ...] = CSA_FIELDS) -> dict:
    """The CSA image header's `wanted` fields as {name: [values]} (fields without values left out)."""
    element = ds.get(CSA_IMAGE_HEADER)
    if element is None:
        return {}
    try:
        return parse_csa(bytes(element.value), wanted)
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise MosaicError(f"CSA image header (0029,1010) cannot be read: {error}") from None


def parse_csa(raw: bytes, wanted: tuple[str, ...] = CSA_FIELDS) -> dict:
    """Siemens CSA1/CSA2 header -> {name: [values]} for the `wanted` names.

    Written here rather than taken from nibabel.nicom.csareader (whose layout rules it follows, and which
    the tests compare it with): nibabel converts every item of the ~100 tags, 9 ms per mosaic file, and
    importing it costs more start-up than the whole header scan of a small folder; this reads only the
    wanted items (~0.2 ms).
    """
    csa2 = raw[:4] == b"SV10"
    offset = 8 if csa2 else 0
    count, _check = struct.unpack_from("<2I", raw, offset)
    if not 0 < count <= 1000:
        raise ValueError(f"{count} tags")
    offset += 8
    out: dict = {}
    first_items = None
    for tag_no in range(count):
        name, vm, vr, _syngodt, items, _last = struct.unpack_from("<64si4s3i", raw, offset)
        offset += 84
        name = name.split(b"\0", 1)[0].decode("latin-1")
        vr = vr.split(b"\0", 1)[0].decode("latin-1")
        if tag_no == 1:
            first_items = items
        if items > 1000:
            raise ValueError(f"tag {name} claims {items} items")
        limit = vm if vm else items
        values = []
        for item_no in range(items):
            lengths = struct.unpack_from("<4i", raw, offset)
            offset += 16
            size = lengths[1] if csa2 else lengths[0] - (first_items or 0)
            if size < 0 or offset + size > len(raw):
                if csa2:
                    raise ValueError(f"item of {name} runs past the header")
                break
            if name in wanted and item_no < limit and size > 0:
                text = raw[offset:offset + size].split(b"\0", 1)[0].decode("latin-1").strip()
                if text:
                    values.append(_csa_value(text, vr))
            offset += size + (-size % 4)
        if name in wanted and values:
            out[name] = values
    return out


def _csa_value(text: str, vr: str):
    if vr in ("FL", "FD", "DS"):
        return float(text)
    if vr in ("IS", "SL", "SS", "UL", "US"):
        return int(float(text))
    return text


def mosaic_layout(ds, tags: dict) -> tuple[int, int, int, int]:
    """(slices, tiles per side, tile rows, tile columns) of a mosaic image."""
    count = tags.get("NumberOfImagesInMosaic")
    if not count or int(count[0]) < 1:
        raise MosaicError("ImageType says MOSAIC but the CSA header has no NumberOfImagesInMosaic")
    slices = int(count[0])
    side = math.ceil(math.sqrt(slices))
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows % side or cols % side:
        raise MosaicError(f"a {rows}x{cols} mosaic cannot hold {side}x{side} tiles for {slices} slices")
    return slices, side, rows // side, cols // side


def slice_normal(ds, tags: dict, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """The CSA SliceNormalVector (unit), or row x column when the header has none."""
    values = tags.get("SliceNormalVector")
    normal = np.cross(row, col)
    if values and len(values) == 3:
        given = np.asarray(values, float)
        if np.linalg.norm(given) > 0:
            given = given / np.linalg.norm(given)
            if abs(abs(float(given @ normal)) - 1) > 1e-3:
                raise MosaicError("CSA SliceNormalVector is not perpendicular to ImageOrientationPatient")
            normal = given
    return normal


def first_tile_position(position, row, col, spacing_xy, rows: int, cols: int, tile_rows: int, tile_cols: int):
    """Centre of the first voxel of tile 0 (ImagePositionPatient is the corner of the whole mosaic)."""
    return (np.asarray(position, float) + row * spacing_xy[0] * (cols - tile_cols) / 2
            + col * spacing_xy[1] * (rows - tile_rows) / 2)


def slice_times(tags: dict, slices: int) -> list[float] | None:
    """MosaicRefAcqTimes (ms) -> seconds per slice in tile order, as BIDS SliceTiming; None if absent."""
    times = tags.get("MosaicRefAcqTimes")
    if not times or len(times) < slices:
        return None
    return [round(float(t) / 1000.0, 6) for t in times[:slices]]


def split_tiles(image: np.ndarray, slices: int, side: int) -> np.ndarray:
    """(rows, cols[, c]) mosaic -> (slices, tile rows, tile cols[, c]); tiles are read row by row."""
    tile_rows, tile_cols = image.shape[0] // side, image.shape[1] // side
    tiles = image.reshape(side, tile_rows, side, tile_cols, *image.shape[2:]).swapaxes(1, 2)
    return tiles.reshape(side * side, tile_rows, tile_cols, *image.shape[2:])[:slices]
