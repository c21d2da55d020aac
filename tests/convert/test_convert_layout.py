"""dcm2niix's voxel order (mmar.convert.layout) and the NIfTI writer (mmar.convert.write): pure checks.

Reordering must never move a voxel in space: every voxel keeps its value at the same world point.
The NIfTI header must say the same in its qform as in its sform (readers use either).
"""

from __future__ import annotations

import numpy as np
import pytest

from mmar.convert import layout, write


def rotation(seed: int, proper: bool = True) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 2] = -q[:, 2]
    return q


def same_voxels_in_space(out: np.ndarray, new: layout.Grid, data: np.ndarray, grid: layout.Grid) -> bool:
    """Every output voxel's world point lands (within 1e-3 voxel) on an input voxel holding the same value."""
    to_index = np.linalg.inv(grid.direction * grid.spacing)
    for z, y, x in np.ndindex(*out.shape):
        point = new.origin + new.direction @ (new.spacing * np.array([x, y, z]))
        index = to_index @ (point - grid.origin)
        if np.abs(index - np.round(index)).max() > 1e-3:
            return False
        i, j, k = np.round(index).astype(int)
        if data[k, j, i] != out[z, y, x]:
            return False
    return out.size == data.size


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("acquisition_3d", [False, True])
def test_reordering_keeps_every_voxel_in_place(seed, acquisition_3d):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    grid = layout.Grid(np.array([10.0, -20.0, 30.0]), rotation(seed, proper=seed % 2 == 0), np.array([0.7, 0.8, 2.5]))
    out, new = layout.dcm2niix_order(data, grid, acquisition_3d=acquisition_3d, rgb=False)
    assert same_voxels_in_space(out, new, data, grid)


def test_2d_acquisition_flips_rows_only():
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    grid = layout.Grid(np.zeros(3), np.eye(3), np.ones(3))
    out, new = layout.dcm2niix_order(data, grid, acquisition_3d=False, rgb=False)
    assert np.array_equal(out, data[:, ::-1, :])
    assert np.allclose(new.ras_affine()[:3, 1], [0, 1, 0])  # second axis runs anterior (RAS +y)


def test_3d_acquisition_gets_closest_ras_orientation():
    # LPS sagittal: rows along -y (anterior), columns along -z (down)
    direction = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)
    out, new = layout.dcm2niix_order(np.zeros((3, 4, 5)), layout.Grid(np.zeros(3), direction, np.ones(3)),
                                     acquisition_3d=True, rgb=False)
    assert np.allclose(new.ras_affine()[:3, :3], np.eye(3))
    assert out.shape == (4, 5, 3)  # (z, y, x): x is now the old slice axis


@pytest.mark.parametrize("seed", range(8))
def test_nifti_qform_matches_sform(tmp_path, seed):
    import nibabel as nib

    affine = np.eye(4)
    affine[:3, :3] = rotation(seed, proper=seed % 2 == 0) * [0.9, 1.1, 3.0]
    affine[:3, 3] = [5.0, -7.0, 11.0]
    data = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)  # (t, z, y, x)
    write.write_nifti(data, affine, tmp_path / "a.nii.gz", time_step=2.5)
    image = nib.load(str(tmp_path / "a.nii.gz"))
    assert image.shape == (5, 4, 3, 2)
    np.testing.assert_allclose(image.get_sform(), affine, atol=1e-5)
    np.testing.assert_allclose(image.get_qform(), affine, atol=1e-4)
    assert image.header["pixdim"][4] == pytest.approx(2.5)
    assert np.array_equal(np.asanyarray(image.dataobj), data.transpose(3, 2, 1, 0))


@pytest.mark.parametrize("have_isal", [True, False])
def test_nii_gz_is_plain_gzip_with_or_without_isal(tmp_path, monkeypatch, have_isal):
    import gzip
    import sys

    import nibabel as nib

    if not have_isal:
        monkeypatch.setitem(sys.modules, "isal", None)  # import fails: the zlib path
        monkeypatch.setitem(sys.modules, "isal.igzip", None)
    data = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write.write_nifti(data, np.diag([1.0, 2.0, 3.0, 1.0]), tmp_path / "a.nii.gz")
    raw = gzip.decompress((tmp_path / "a.nii.gz").read_bytes())
    assert raw[344:348] == b"n+1\0" and len(raw) == 352 + data.size
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj), data.transpose(2, 1, 0))
