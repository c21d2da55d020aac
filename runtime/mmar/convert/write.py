"""Output names and writing: stable, collision-free names; never overwrite without -f; temp file + rename."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

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

    if target.name.lower().endswith(".nii.gz") and compress:
        _write_nii_gz(image, target)
        return
    with atomic_path(target) as tmp:
        # .mha honours the flag
        sitk.WriteImage(image, str(tmp), compress)


# gzip level for .nii.gz: level 1 compresses several times faster than zlib's default 6 for files a few %
# larger (nibabel also writes level 1 by default); any gzip reader reads either.
GZIP_LEVEL = 1


def _write_nii_gz(image, target: Path) -> None:
    """SimpleITK writes the NIfTI uncompressed to a temp file beside the target; we gzip it at GZIP_LEVEL
    (SimpleITK's NIfTI writer ignores a compression level)."""
    import SimpleITK as sitk

    from mmar.io import atomic_path

    fd, raw = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.nii", dir=target.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, raw, False)
        data = Path(raw).read_bytes()
    finally:
        os.unlink(raw)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(gzip_bytes(data))


# NIfTI-1 datatype codes (nifti1.h) by numpy type
NIFTI_TYPES = {"uint8": 2, "int16": 4, "int32": 8, "float32": 16, "float64": 64, "int8": 256, "uint16": 512,
               "uint32": 768, "int64": 1024, "uint64": 1280}
RGB24 = 128


def quaternion(rotation: np.ndarray) -> tuple[float, float, float, float]:
    """(b, c, d, qfac) of a 3x3 rotation with unit columns, as nifti1_io's nifti_mat44_to_quatern."""
    r = np.array(rotation, float)
    qfac = 1.0
    if np.linalg.det(r) < 0:
        qfac = -1.0
        r[:, 2] = -r[:, 2]
    a = r[0, 0] + r[1, 1] + r[2, 2] + 1
    if a > 0.5:
        a = 0.5 * np.sqrt(a)
        b, c, d = 0.25 * (r[2, 1] - r[1, 2]) / a, 0.25 * (r[0, 2] - r[2, 0]) / a, 0.25 * (r[1, 0] - r[0, 1]) / a
    else:
        xd = 1 + r[0, 0] - (r[1, 1] + r[2, 2])
        yd = 1 + r[1, 1] - (r[0, 0] + r[2, 2])
        zd = 1 + r[2, 2] - (r[0, 0] + r[1, 1])
        if xd > 1:
            b = 0.5 * np.sqrt(xd)
            c, d, a = 0.25 * (r[0, 1] + r[1, 0]) / b, 0.25 * (r[0, 2] + r[2, 0]) / b, 0.25 * (r[2, 1] - r[1, 2]) / b
        elif yd > 1:
            c = 0.5 * np.sqrt(yd)
            b, d, a = 0.25 * (r[0, 1] + r[1, 0]) / c, 0.25 * (r[1, 2] + r[2, 1]) / c, 0.25 * (r[0, 2] - r[2, 0]) / c
        else:
            d = 0.5 * np.sqrt(zd)
            b, c, a = 0.25 * (r[0, 2] + r[2, 0]) / d, 0.25 * (r[1, 2] + r[2, 1]) / d, 0.25 * (r[1, 0] - r[0, 1]) / d
        if a < 0:
            b, c, d = -b, -c, -d
    return float(b), float(c), float(d), qfac


def nifti_header(shape: tuple, dtype: np.dtype, affine: np.ndarray, time_step: float, rgb: bool) -> bytes:
    """A NIfTI-1 single-file header (+ the 4 empty extension bytes) for an (x, y, z[, t]) volume.

    Written here (not with nibabel or SimpleITK) so that a DICOM conversion writes straight from numpy:
    importing nibabel costs more than converting a small series, and SimpleITK needs a temp file to
    gzip at a chosen level. Both sform and qform hold the affine (code 1, scanner), units mm and s."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    b, c, d, qfac = quaternion(affine[:3, :3] / spacing)
    header = np.zeros(1, dtype=HEADER_DTYPE)[0]
    header["sizeof_hdr"] = 348
    header["dim"][: len(shape) + 1] = (len(shape), *shape)
    header["dim"][len(shape) + 1:] = 1
    header["datatype"] = RGB24 if rgb else NIFTI_TYPES[np.dtype(dtype).name]
    header["bitpix"] = 24 if rgb else np.dtype(dtype).itemsize * 8
    header["pixdim"][:5] = (qfac, *spacing, time_step if len(shape) > 3 else 0.0)
    header["pixdim"][5:] = 1.0 if len(shape) <= 3 else 0.0
    header["vox_offset"] = 352.0
    header["scl_slope"] = 1.0
    header["xyzt_units"] = 2 | 8  # mm, s
    header["descrip"] = b"mmar convert"
    header["qform_code"] = header["sform_code"] = 1  # scanner anatomical
    header["quatern_b"], header["quatern_c"], header["quatern_d"] = b, c, d
    header["qoffset_x"], header["qoffset_y"], header["qoffset_z"] = affine[:3, 3]
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    header["magic"] = b"n+1"
    return header.tobytes() + b"\0\0\0\0"


HEADER_DTYPE = np.dtype([
    ("sizeof_hdr", "<i4"), ("data_type", "S10"), ("db_name", "S18"), ("extents", "<i4"), ("session_error", "<i2"),
    ("regular", "S1"), ("dim_info", "u1"), ("dim", "<i2", (8,)), ("intent_p1", "<f4"), ("intent_p2", "<f4"),
    ("intent_p3", "<f4"), ("intent_code", "<i2"), ("datatype", "<i2"), ("bitpix", "<i2"), ("slice_start", "<i2"),
    ("pixdim", "<f4", (8,)), ("vox_offset", "<f4"), ("scl_slope", "<f4"), ("scl_inter", "<f4"),
    ("slice_end", "<i2"), ("slice_code", "u1"), ("xyzt_units", "u1"), ("cal_max", "<f4"), ("cal_min", "<f4"),
    ("slice_duration", "<f4"), ("toffset", "<f4"), ("glmax", "<i4"), ("glmin", "<i4"), ("descrip", "S80"),
    ("aux_file", "S24"), ("qform_code", "<i2"), ("sform_code", "<i2"), ("quatern_b", "<f4"), ("quatern_c", "<f4"),
    ("quatern_d", "<f4"), ("qoffset_x", "<f4"), ("qoffset_y", "<f4"), ("qoffset_z", "<f4"), ("srow_x", "<f4", (4,)),
    ("srow_y", "<f4", (4,)), ("srow_z", "<f4", (4,)), ("intent_name", "S16"), ("magic", "S4"),
])
assert HEADER_DTYPE.itemsize == 348


def gzip_bytes(data: bytes) -> bytes:
    """gzip at GZIP_LEVEL; with python-isal (ISA-L) when installed, several times faster than zlib."""
    try:
        from isal import igzip
    except ImportError:
        import gzip

        return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
    return igzip.compress(data, compresslevel=GZIP_LEVEL)


def write_nifti(data: np.ndarray, affine: np.ndarray, target: Path, time_step: float = 1.0, rgb: bool = False) -> None:
    """numpy (t, z, y, x[, c]) or (z, y, x[, c]) + RAS affine -> .nii / .nii.gz, atomically."""
    from mmar.io import atomic_path

    spatial = data.shape[: data.ndim - (1 if rgb else 0)]
    if rgb and (data.dtype != np.uint8 or data.shape[-1] != 3):
        raise ValueError("RGB NIfTI needs uint8 with 3 samples per pixel")
    payload = nifti_header(tuple(reversed(spatial)), data.dtype, affine, time_step, rgb)
    payload += np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
    if target.name.lower().endswith(".gz"):
        payload = gzip_bytes(payload)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)
