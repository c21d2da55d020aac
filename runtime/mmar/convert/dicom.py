"""DICOM series -> volume: geometry from the headers (pure), then pixels (read straight from the file,
`encapsulated` for lossless compressed ones, else pydicom, GDCM through SimpleITK as fallback).

Geometry rules (the part that is easy to get wrong):
- slices are ordered by their position along the slice normal n = row x column cosines
  (ImagePositionPatient . n), never by file name or InstanceNumber; the origin is the first slice
  along n and the third axis of the direction matrix is n, so the grid is right-handed (Siemens
  mosaics: n is the CSA SliceNormalVector, which may point the other way, as dcm2niix keeps it);
- several images at one position make a 4D series (volumes ordered by temporal position,
  acquisition number, instance number), provided every position has the same count;
- uneven spacing or missing slices are warned about (missing positions listed) and the stack is
  interpolated onto a uniform grid, so the written affine is true everywhere;
- gantry tilt (slice origins drifting in-plane) is corrected by resampling onto the orthogonal grid;
- rescale slope/intercept are applied per slice; the result stays integer (bit-exact) where slope
  and intercept are integers, float32 otherwise;
- enhanced multi-frame files give one record per frame from the functional groups; RT Dose
  frames are placed with GridFrameOffsetVector.
Coordinates are DICOM patient coordinates (LPS), as ITK/SimpleITK expect. `layout` then puts the volume in
dcm2niix's voxel order; uncompressed little-endian pixels are read straight from the file, lossless
compressed ones decoded by the codec's own module (`raw_pixels`, `encapsulated`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class SeriesError(Exception):
    """This series cannot be made into a volume (the message says why); other series go on."""


@dataclass
class SliceInfo:
    """One 2D image: a file, or one frame of a multi-frame file, with the header values geometry needs."""

    path: Path
    frame: int  # -1: single-frame file
    rows: int
    cols: int
    samples: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None  # 6 direction cosines (row, column)
    spacing: tuple[float, float]  # (between columns = x, between rows = y) in mm
    slope: float
    intercept: float
    order: tuple  # tie-break / volume order among images at one position
    thickness: float | None = None
    grid_key: tuple = field(default=(), compare=False)
    normal: tuple[float, float, float] | None = None  # slice normal when not row x column (Siemens mosaic)
    mosaic: tuple[int, int] = ()  # (slices, tiles per side): `frame` is the tile of a mosaic image
    acquisition_3d: bool = False  # MRAcquisitionType 3D: dcm2niix writes these in the closest RAS orientation
    repetition_ms: float = 0.0  # RepetitionTime: the time step of a 4D series
    raw: tuple = ()  # where the pixels are read without pydicom: raw_pixels (uncompressed) or encapsulated.plan


def _floats(value, n: int | None = None):
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if n is None or len(out) == n else None


def _num(value, default):
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _first_item(ds, *path):
    """Walk nested sequences (taking item 0) and return the last element, or None."""
    node = ds
    for keyword in path:
        if node is None or keyword not in node:
            return None
        node = node.get(keyword)
        if hasattr(node, "__len__") and not isinstance(node, (str, bytes)) and keyword.endswith("Sequence"):
            node = node[0] if len(node) else None
    return node


NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}  # UID -> explicit VR


def raw_pixels(ds, pixel_offset: int | None) -> tuple:
    """Where the pixels of an uncompressed little-endian file start, to read them without pydicom:
    (offset of the PixelData element, dtype, array shape, bits stored, explicit VR); for compressed pixels
    the codec's own module decodes exactly as pydicom would, `encapsulated.plan` ("encapsulated", ...); ()
    for anything else (big endian, odd bit depths, planar RGB, colour JPEG, ...), which pydicom decodes."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "get", lambda *_: None)("TransferSyntaxUID") or "")
    if pixel_offset is None:
        return ()
    if syntax not in NATIVE_LITTLE_ENDIAN:
        from mmar.convert import encapsulated

        return encapsulated.plan(ds, syntax, pixel_offset)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if bits not in (8, 16, 32) or (samples > 1 and int(ds.get("PlanarConfiguration", 0) or 0) != 0):
        return ()
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    stored = int(ds.get("BitsStored", bits) or bits)
    if signed and stored != bits:  # needs sign extension: pydicom does it
        return ()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (frames, int(ds.Rows), int(ds.Columns)) + ((samples,) if samples > 1 else ())
    dtype = f"<{'i' if signed else 'u'}{bits // 8}"
    return (pixel_offset, dtype, shape, stored, NATIVE_LITTLE_ENDIAN[syntax])


def slices_from_header(ds, path: Path, pixel_offset: int | None = None) -> list[SliceInfo]:
    """Header -> one SliceInfo per 2D image in the file (pure: no pixel data needed).

    pixel_offset: where the element after the header starts in the file (None: unknown)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    instance = int(_num(ds.get("InstanceNumber"), 0))
    base_order = (
        int(_num(ds.get("TemporalPositionIdentifier"), 0)),
        int(_num(ds.get("AcquisitionNumber"), 0)),
        instance,
        str(ds.get("AcquisitionTime", "")),
    )
    thickness = _num(ds.get("SliceThickness"), None)
    step = _num(ds.get("SpacingBetweenSlices"), None)
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")

    # images that cannot share one grid must not share one volume
    same_file = (str(ds.get("EchoNumbers", "")), tuple(ds.get("ImageType", ())), int(ds.get("BitsAllocated", 0) or 0))

    def key(orientation, spacing):
        orient = tuple(round(v, 4) for v in orientation) if orientation else None
        return (rows, cols, samples, orient, tuple(round(v, 4) for v in spacing), *same_file)

    extra = {"acquisition_3d": str(ds.get("MRAcquisitionType", "")).upper() == "3D",
             "repetition_ms": _num(ds.get("RepetitionTime"), 0.0), "raw": raw_pixels(ds, pixel_offset)}
    if per_frame:  # enhanced multi-frame (CT/MR/PET): geometry lives in the functional groups
        out = []
        for index, item in enumerate(per_frame):
            def group(name, item=item):
                value = _first_item(item, name)
                return value if value is not None else _first_item(shared, name) if shared is not None else None

            pos = _floats(getattr(group("PlanePositionSequence"), "ImagePositionPatient", None), 3)
            orient = _floats(getattr(group("PlaneOrientationSequence"), "ImageOrientationPatient", None), 6)
            measures = group("PixelMeasuresSequence")
            spacing = _floats(getattr(measures, "PixelSpacing", None), 2) or (1.0, 1.0)
            thick = _num(getattr(measures, "SliceThickness", None), thickness)
            if step is None and measures is not None:
                step_here = _num(getattr(measures, "SpacingBetweenSlices", None), None)
            else:
                step_here = step
            rescale = group("PixelValueTransformationSequence")
            slope = _num(getattr(rescale, "RescaleSlope", None), _num(ds.get("RescaleSlope"), 1.0))
            intercept = _num(getattr(rescale, "RescaleIntercept", None), _num(ds.get("RescaleIntercept"), 0.0))
            content = group("FrameContentSequence")
            dim_index = tuple(getattr(content, "DimensionIndexValues", ()) or ()) if content is not None else ()
            temporal = int(_num(getattr(content, "TemporalPositionIndex", None), 0)) if content is not None else 0
            info = SliceInfo(path, index, rows, cols, samples, pos, orient, (spacing[1], spacing[0]), slope, intercept,
                             (temporal, *base_order[1:3], index, tuple(int(v) for v in dim_index if str(v).lstrip("-").isdigit())),
                             step_here or thick, **extra)
            info.grid_key = key(orient, spacing)
            out.append(info)
        return out

    pos = _floats(ds.get("ImagePositionPatient"), 3)
    orient = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2) or _floats(ds.get("ImagerPixelSpacing"), 2) or (1.0, 1.0)
    slope = _num(ds.get("RescaleSlope"), 1.0)
    intercept = _num(ds.get("RescaleIntercept"), 0.0)
    if str(ds.get("Modality", "")).upper() == "RTDOSE" and ds.get("DoseGridScaling") is not None:
        slope *= _num(ds.get("DoseGridScaling"), 1.0)
    if frames == 1 and pos and orient:
        from mmar.convert import mosaic

        if mosaic.is_mosaic(ds):
            return _mosaic_slices(ds, path, pos, orient, spacing, slope, intercept, base_order, step or thickness,
                                  key, extra)
    if frames == 1:
        info = SliceInfo(path, -1, rows, cols, samples, pos, orient, (spacing[1], spacing[0]), slope, intercept,
                         base_order, step or thickness, **extra)
        info.grid_key = key(orient, spacing)
        return [info]
    # classic multi-frame: frames stacked along the normal at GridFrameOffsetVector (RT Dose) or a fixed step
    offsets = _floats(ds.get("GridFrameOffsetVector"))
    if offsets is None or len(offsets) != frames:
        offsets = tuple(i * (step or thickness or 1.0) for i in range(frames)) if pos and orient else None
    out = []
    for index in range(frames):
        frame_pos = None
        if pos and orient and offsets is not None:
            normal = np.cross(orient[:3], orient[3:])
            frame_pos = tuple(float(v) for v in np.asarray(pos) + offsets[index] * normal)
        info = SliceInfo(path, index, rows, cols, samples, frame_pos, orient, (spacing[1], spacing[0]), slope,
                         intercept, (*base_order, index), step or thickness, **extra)
        info.grid_key = key(orient, spacing)
        out.append(info)
    return out


def _mosaic_slices(ds, path, pos, orient, spacing, slope, intercept, order, step, key, extra) -> list[SliceInfo]:
    """One SliceInfo per tile of a Siemens mosaic, placed as dcm2niix places them (see mmar.convert.mosaic)."""
    from mmar.convert import mosaic

    tags = mosaic.csa_image_tags(ds)
    count, side, tile_rows, tile_cols = mosaic.mosaic_layout(ds, tags)
    row, col = np.asarray(orient[:3], float), np.asarray(orient[3:], float)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = mosaic.slice_normal(ds, tags, row, col)
    spacing_xy = (spacing[1], spacing[0])
    first = mosaic.first_tile_position(pos, row, col, spacing_xy, int(ds.Rows), int(ds.Columns), tile_rows, tile_cols)
    dz = step or 1.0
    # tiles of different mosaics (35 vs 36 slices, other normals) must not share a volume
    grid_key = (*key(orient, spacing), "mosaic", tile_rows, tile_cols, count, tuple(round(float(v), 4) for v in normal))
    normal_tuple = tuple(float(v) for v in normal)
    out = []
    places = (first[None, :] + np.arange(count)[:, None] * dz * normal[None, :]).tolist()
    for tile in range(count):
        info = SliceInfo(path, tile, tile_rows, tile_cols, 1, tuple(places[tile]), orient, spacing_xy, slope,
                         intercept, order, dz,
                         normal=normal_tuple, mosaic=(count, side), **extra)
        info.grid_key = grid_key
        out.append(info)
    return out


@dataclass
class VolumePlan:
    """Where every stored image goes, and the grid the volume is written on (LPS)."""

    origin: np.ndarray  # (3,)
    direction: np.ndarray  # (3, 3), columns: row, column, normal
    spacing: np.ndarray  # (3,) x, y, z in mm
    stack: list[list[SliceInfo]]  # [volume][slice along n]
    slice_pos: np.ndarray  # (nslices,) position of the stored slices along n, relative to origin
    target_pos: np.ndarray | None  # uniform positions to interpolate onto (uneven spacing), else None
    shear: np.ndarray | None  # in-plane drift (mm, LPS) per mm along n (gantry tilt), else None
    warnings: list[str] = field(default_factory=list)


def plan_volume(slices: list[SliceInfo], tolerance: float = 0.01) -> VolumePlan:
    """Order the images of one series along the normal and derive its grid. Raises SeriesError."""
    if not slices:
        raise SeriesError("no images")
    first = slices[0]
    warnings: list[str] = []
    sx, sy = first.spacing
    if any(s.position is None or s.orientation is None for s in slices):
        if len(slices) > 1:
            raise SeriesError("images have no ImagePositionPatient/ImageOrientationPatient: cannot order the slices")
        warnings.append("no patient geometry (ImagePositionPatient missing): written with identity orientation")
        return VolumePlan(np.zeros(3), np.eye(3), np.array([sx, sy, first.thickness or 1.0]), [[first]],
                          np.zeros(1), None, None, warnings)
    row = np.asarray(first.orientation[:3], float)
    col = np.asarray(first.orientation[3:], float)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.asarray(first.normal, float) if first.normal is not None else np.cross(row, col)
    positions = np.array([s.position for s in slices], float)
    along = positions @ normal
    # group images at one position (within tolerance) -> slots; several per slot = 4D
    order = np.argsort(along, kind="stable")
    slots: list[list[int]] = []
    for index in order:
        if slots and abs(along[index] - along[slots[-1][0]]) <= tolerance:
            slots[-1].append(index)
        else:
            slots.append([index])
    counts = {len(slot) for slot in slots}
    if len(counts) > 1:
        detail = ", ".join(f"{along[slot[0]]:.2f} mm: {len(slot)}" for slot in slots[:8])
        raise SeriesError(f"positions hold different numbers of images ({detail}...): "
                          "mixed or incomplete series, cannot form a volume")
    nvol = counts.pop()
    for slot in slots:
        slot.sort(key=lambda i: slices[i].order)
    stack = [[slices[slot[v]] for slot in slots] for v in range(nvol)]
    slot_along = np.array([along[slot[0]] for slot in slots])
    origin = positions[slots[0][0]]
    rel = slot_along - slot_along[0]

    target = None
    if len(slots) == 1:
        dz = first.thickness or 1.0
    else:
        steps = np.diff(rel)
        nominal = _median(steps)
        if nominal <= 0:
            raise SeriesError("slices are not separated along the normal")
        tol = max(tolerance, 0.01 * nominal)
        if np.all(np.abs(steps - nominal) <= tol):
            dz = (rel[-1]) / (len(rel) - 1)
        else:
            multiples = steps / nominal
            gaps = [(i, int(round(m))) for i, m in enumerate(multiples) if round(m) >= 2 and abs(m - round(m)) * nominal <= tol]
            if gaps and len(gaps) == int(np.sum(np.abs(steps - nominal) > tol)):
                missing = [f"{slot_along[i] + k * nominal:.2f}" for i, m in gaps for k in range(1, m)]
                warnings.append(f"missing slices at {len(missing)} position(s) along the normal (mm): "
                                f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}; interpolated")
            else:
                warnings.append(f"uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm): "
                                f"interpolated onto a uniform {nominal:.3f} mm grid")
            count = int(round(rel[-1] / nominal)) + 1
            dz = rel[-1] / (count - 1)
            target = np.arange(count) * dz
    # gantry tilt: the slice origins drift in-plane linearly with the distance along n
    shear = None
    if len(slots) > 1:
        drift = positions[[slot[0] for slot in slots]] - origin
        inplane = drift - np.outer(drift @ normal, normal)
        if np.abs(inplane).max() > max(tolerance, 1e-3 * min(sx, sy)):
            fit = np.linalg.lstsq(rel[:, None], inplane, rcond=None)[0][0]
            if np.abs(inplane - np.outer(rel, fit)).max() > max(0.1 * min(sx, sy), tolerance):
                raise SeriesError("slice positions do not lie on one line (inconsistent geometry)")
            shear = fit
            angle = np.degrees(np.arctan(np.linalg.norm(fit)))
            warnings.append(f"gantry tilt {angle:.2f} deg: resampled onto an orthogonal grid")
    direction = np.stack([row, col, normal], axis=1)
    return VolumePlan(origin, direction, np.array([sx, sy, dz], float), stack, rel, target, shear, warnings)


def _median(values: np.ndarray) -> float:
    """np.median of a 1D float array without NaN, bit for bit ((a + b) / 2 of the middle two when even),
    without np.median's import of numpy.ma (~10 ms of a small folder's run)."""
    ordered = np.sort(values)
    middle = len(ordered) // 2
    return float(ordered[middle]) if len(ordered) % 2 else float((ordered[middle - 1] + ordered[middle]) / 2)


def _read_raw(path: Path, raw: tuple) -> np.ndarray | None:
    """Uncompressed pixels straight from the file (see raw_pixels); None where pydicom must decode them
    (the element is not where the header said, or values use bits above BitsStored)."""
    offset, dtype, shape, stored, explicit = raw
    count = int(np.prod(shape))
    with open(path, "rb") as handle:
        handle.seek(offset)
        head = handle.read(12 if explicit else 8)
        if head[:4] != b"\xe0\x7f\x10\x00":  # (7FE0,0010) Pixel Data
            return None
        length = int.from_bytes(head[8:12] if explicit else head[4:8], "little")
        if length == 0xFFFFFFFF or length < count * np.dtype(dtype).itemsize:
            return None
        array = np.fromfile(handle, dtype=dtype, count=count)
    if array.size < count:
        return None
    if stored < np.dtype(dtype).itemsize * 8 and array.size and int(array.max()) >> stored:
        return None  # high bits hold something else: leave the masking to pydicom
    return array.reshape(shape)


def _decode(path: Path, cache: dict, mosaic_shape: tuple = (), raw: tuple = ()) -> tuple[np.ndarray, bool]:
    """All frames of one file as (frames, rows, cols[, samples]); True if GDCM already applied rescale."""
    if path in cache:
        return cache[path]
    if raw and raw[0] == "encapsulated":  # compressed: the codec's own module, pydicom where it declines
        from mmar.convert import encapsulated

        array = encapsulated.decode(path, raw)
    else:
        array = _read_raw(path, raw) if raw else None
    if array is not None:
        if mosaic_shape:
            from mmar.convert.mosaic import split_tiles

            array = split_tiles(array[0], *mosaic_shape)
        cache.clear()
        cache[path] = (array, False)
        return array, False
    from mmar.convert.header import import_pydicom

    pydicom = import_pydicom()
    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            raise SeriesError(f"{path.name}: image slice cannot be read: no pixel data (the file ends after "
                              f"{path.stat().st_size} bytes: truncated?)")
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        if not ds.file_meta.TransferSyntaxUID.is_compressed and len(ds.PixelData) < expected:
            raise SeriesError(f"{path.name}: truncated pixel data ({len(ds.PixelData)} of {expected} bytes)")
        array, rescaled = ds.pixel_array, False
    except SeriesError:
        raise
    except Exception as pydicom_error:  # codec pydicom lacks (or odd encoding): GDCM through SimpleITK
        try:
            import SimpleITK as sitk

            array, rescaled = sitk.GetArrayFromImage(sitk.ReadImage(str(path))), True
        except Exception:
            raise SeriesError(f"{path.name}: cannot decode pixel data ({pydicom_error})") from None
    if mosaic_shape:  # one mosaic image -> its tiles, as frames
        from mmar.convert.mosaic import split_tiles

        plane = array[0] if rescaled and array.ndim == 3 and array.shape[0] == 1 else array
        array = split_tiles(plane, *mosaic_shape)
        cache.clear()
        cache[path] = (array, rescaled)
        return array, rescaled
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1) if not rescaled else array.shape[0]
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1) if not rescaled else (array.shape[-1] if array.ndim == 4 else 1)
    if frames == 1 and array.ndim == (2 if samples == 1 else 3):
        array = array[None]
    cache.clear()  # keep one file: multi-frame files are read once, single-frame series never pile up
    cache[path] = (array, rescaled)
    return array, rescaled


def read_volume(plan: VolumePlan, label: bool = False) -> np.ndarray:
    """Decode, rescale and stack: (z, y, x), (t, z, y, x), or (..., 3) for RGB, on the plan's grid."""
    cache: dict = {}
    all_slices = [s for vol in plan.stack for s in vol]
    integral = all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in all_slices)
    identity = all(s.slope == 1 and s.intercept == 0 for s in all_slices)
    volumes = []
    for vol in plan.stack:
        planes = []
        for info in vol:
            frames, rescaled = _decode(info.path, cache, info.mosaic, info.raw)
            plane = frames[max(info.frame, 0)]
            if not rescaled and not identity:
                plane = plane.astype(np.float64) * info.slope + info.intercept
            planes.append(plane)
        volumes.append(np.stack(planes))
    data = np.stack(volumes)
    if not identity:  # rescaled: integers stay integers (bit-exact), anything else is float32
        data = _narrow(data, integral)
    if plan.target_pos is not None:
        data = _regrid(data, plan.slice_pos, plan.target_pos, label)
    return data[0] if len(plan.stack) == 1 else data


def _narrow(data: np.ndarray, integral: bool) -> np.ndarray:
    """Rescaled values -> the smallest integer type that holds them exactly, else float32."""
    if integral:
        lo, hi = float(data.min()), float(data.max())
        for dtype in (np.uint8, np.int16, np.uint16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return data.astype(dtype)
    return data.astype(np.float32)


def _regrid(data: np.ndarray, source: np.ndarray, target: np.ndarray, label: bool) -> np.ndarray:
    """Interpolate axis 1 (slices) from positions `source` onto `target` (linear; nearest for labels)."""
    upper = np.clip(np.searchsorted(source, target, side="left"), 1, len(source) - 1)
    lower = upper - 1
    weight = ((target - source[lower]) / (source[upper] - source[lower])).clip(0, 1)
    if label or data.dtype.kind not in "fiu" or data.ndim == 5:
        pick = np.where(weight < 0.5, lower, upper)
        return data[:, pick]
    w = weight.reshape(1, -1, *([1] * (data.ndim - 2)))
    out = data[:, lower] * (1 - w) + data[:, upper] * w
    return out.astype(np.float32)
