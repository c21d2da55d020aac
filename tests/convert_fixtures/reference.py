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


def run_dcm2niix(folder: Path, out: Path) -> list[Path]:
    """Convert `folder` with dcm2niix (gzip, no BIDS sidecar, no tilt/crop extras); return the NIfTI files."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([dcm2niix_binary(), "-z", "y", "-b", "n", "-f", "%s_%j", "-o", str(out), str(folder)],
                   check=True, capture_output=True, text=True)
    return sorted(out.glob("*.nii.gz"))


def canonical(path: Path):
    """(data as float64 in RAS+ closest-canonical axis order, affine) with NIfTI scl_slope/inter applied."""
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
    ornt = nib.orientations.io_orientation(image.affine)
    data = nib.orientations.apply_orientation(data, ornt)
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape[:3])
    return data, affine


def compare(ours: Path, reference: Path, atol_mm: float = 1e-3, exact: bool = True, rtol: float = 1e-5) -> None:
    """Raise AssertionError unless both files hold the same voxels on the same physical grid."""
    a, a_affine = canonical(ours)
    b, b_affine = canonical(reference)
    assert a.shape == b.shape, f"shape {a.shape} != dcm2niix {b.shape}"
    np.testing.assert_allclose(a_affine, b_affine, atol=atol_mm, err_msg="affine differs from dcm2niix")
    if exact:
        assert np.array_equal(a, b), f"voxels differ from dcm2niix (max abs diff {np.abs(a.astype(float) - b).max()})"
    else:
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg="voxels differ from dcm2niix")
