"""dcm2niix as the reference: run it on a folder, compare our NIfTI with its output on voxels and grid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


def dcm2niix_binary() -> str | None:
    """The dcm2niix executable (the PyPI wheel puts it beside the interpreter), or None."""
    beside = Path(sys.executable).with_name("dcm2niix")
    if beside.exists():
        return str(beside)
    return shutil.which("dcm2niix")


def run_dcm2niix(folder: Path, out: Path, sidecar: bool = False) -> list[Path]:
    """Convert `folder` with dcm2niix (gzip, BIDS sidecar only if asked, no tilt/crop extras); return the NIfTI
    files."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([dcm2niix_binary(), "-z", "y", "-b", "y" if sidecar else "n", "-f", "%s_%j", "-o", str(out),
                    str(folder)],
                   check=True, capture_output=True, text=True)
    return sorted(out.glob("*.nii.gz"))


def canonical(path: Path, reorient: bool = True):
    """(data, affine) with NIfTI scl_slope/inter applied; in RAS+ closest-canonical axis order when `reorient`,
    else in the file's own voxel order."""
    import nibabel as nib

    image = nib.load(str(path))
    raw = np.asanyarray(image.dataobj.get_unscaled())
    if raw.dtype.names:  # RGB24 as a structured dtype -> trailing channel axis
        data = np.stack([raw[name] for name in raw.dtype.names], axis=-1)
    elif image.dataobj.slope not in (None, 1) or image.dataobj.inter not in (None, 0):
        data = image.get_fdata()
    else:
        data = raw
    while data.ndim > 3 and data.shape[3] == 1:  # 3D written with a singleton 4th axis
        data = data[:, :, :, 0]
    if not reorient:
        return data, image.affine
    ornt = nib.orientations.io_orientation(image.affine)
    data = nib.orientations.apply_orientation(data, ornt)
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape[:3])
    return data, affine


def compare(ours: Path, reference: Path, atol_mm: float = 1e-3, exact: bool = True, rtol: float = 1e-5,
            same_order: bool = True) -> None:
    """Raise AssertionError unless both files hold the same voxels on the same physical grid.

    same_order: the arrays must match as stored (dcm2niix's voxel order, the same affine), not only after
    both are put in RAS+ order: a label drawn on one then fits the other voxel for voxel."""
    a, a_affine = canonical(ours, reorient=not same_order)
    b, b_affine = canonical(reference, reorient=not same_order)
    assert a.shape == b.shape, f"shape {a.shape} != dcm2niix {b.shape}"
    import nibabel as nib

    headers = [nib.load(str(p)).header for p in (ours, reference)]
    if headers[1]["dim"][0] >= 4 and headers[1]["dim"][4] > 1:  # a 4D series: the time step too (TR, s)
        np.testing.assert_allclose(headers[0]["pixdim"][4], headers[1]["pixdim"][4], rtol=1e-5,
                                   err_msg="pixdim[4] (time step) differs from dcm2niix")
    np.testing.assert_allclose(a_affine, b_affine, atol=atol_mm, err_msg="affine differs from dcm2niix")
    if exact:
        assert np.array_equal(a, b), f"voxels differ from dcm2niix (max abs diff {np.abs(a.astype(float) - b).max()})"
    else:
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg="voxels differ from dcm2niix")


def compare_sidecars(ours: Path, reference: Path) -> None:
    """The BIDS JSON fields both converters write hold the same values (numbers within 1e-4)."""
    import json

    a = json.loads(ours.with_name(ours.name.replace(".nii.gz", ".json")).read_text())
    b = json.loads(reference.with_name(reference.name.replace(".nii.gz", ".json")).read_text())
    shared = set(a) & set(b) - {"ConversionSoftware", "ConversionSoftwareVersion"}
    assert {"Modality", "ImageOrientationPatientDICOM"} <= shared
    for key in sorted(shared):
        numeric = not isinstance(b[key], (str, bool)) and not (isinstance(b[key], list) and b[key]
                                                                 and isinstance(b[key][0], str))
        if numeric:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4, err_msg=key)
        else:
            assert a[key] == b[key], f"{key}: {a[key]!r} != dcm2niix {b[key]!r}"
