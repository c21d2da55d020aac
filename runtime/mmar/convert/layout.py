"""Put a volume in dcm2niix's voxel order: the same array and affine as dcm2niix writes (pure numpy).

A volume comes out of `dicom.read_volume` on the DICOM grid: x along the row cosines, y along the column
cosines (top row first), z ascending along the slice normal. dcm2niix (nii_dicom_batch.cpp) then:
- for a 3D acquisition (MRAcquisitionType 3D) with more than one slice, not 4D, not RGB: rotates the
  volume to the orthogonal orientation closest to RAS (`nii_setOrtho` in nii_ortho.cpp): the new first
  voxel is the corner nearest the left-posterior-inferior extreme, the axes are permuted to best match
  x, y, z;
- otherwise (2D acquisitions, CT, 4D, single slices): flips the rows (`nii_flipY`), so the second NIfTI
  axis runs against the DICOM column direction (anterior for an axial slice).
Labels drawn on a dcm2niix conversion then line up voxel for voxel with ours, even in tools that ignore
the affine.

Geometry is exchanged as (origin, direction, spacing) in DICOM patient coordinates (LPS), direction
columns = the unit vectors of the x, y, z array axes, as SimpleITK takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Grid:
    origin: np.ndarray  # (3,) LPS position of voxel (0, 0, 0)
    direction: np.ndarray  # (3, 3) columns: unit vectors of the x, y, z axes (LPS)
    spacing: np.ndarray  # (3,) mm

    def ras_affine(self) -> np.ndarray:
        affine = np.eye(4)
        affine[:3, :3] = LPS_TO_RAS @ self.direction * self.spacing
        affine[:3, 3] = LPS_TO_RAS @ self.origin
        return affine


def _spatial_axes(data: np.ndarray, rgb: bool) -> tuple[int, int, int]:
    """numpy axes of x, y, z in a (..., z, y, x[, c]) array."""
    last = data.ndim - (2 if rgb else 1)
    return last, last - 1, last - 2


def flip_rows(data: np.ndarray, grid: Grid, rgb: bool = False) -> tuple[np.ndarray, Grid]:
    """dcm2niix's nii_flipY: reverse the rows; voxel (x, 0, z) is now the last DICOM row."""
    _, y_axis, _ = _spatial_axes(data, rgb)
    rows = data.shape[y_axis]
    column = grid.direction[:, 1]
    origin = grid.origin + (rows - 1) * grid.spacing[1] * column
    direction = grid.direction.copy()
    direction[:, 1] = -column
    return np.flip(data, axis=y_axis), Grid(origin, direction, grid.spacing.copy())


def _best_orient(matrix: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """getBestOrient: of the 6 axis permutations (with the given flips), the one maximising trace(R @ N)."""
    permutations = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    best, chosen = 0.0, None
    for perm in permutations:
        candidate = np.zeros((3, 3))
        for i, j in enumerate(perm):  # LOAD_MAT33 rows: row i has flips[i] in column perm[i]
            candidate[i, j] = flips[i]
        value = float(np.trace(matrix @ candidate))
        if value > best:
            best, chosen = value, candidate
    return chosen


def to_ortho(data: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid]:
    """dcm2niix's nii_setOrtho for a 3D (z, y, x) volume: the closest orthogonal RAS-like orientation."""
    affine = grid.ras_affine()
    matrix = affine[:3, :3]
    if np.all(np.diag(matrix) > 0) and np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 0:
        return data, grid
    dims = np.array(data.shape[::-1], float)  # x, y, z sizes
    # minCornerFlip: the corner nearest the most left-posterior-inferior point of all corners
    corners, flip_sets = [], []
    for i in range(8):
        flips = np.array([-1 if i & 1 else 1, -1 if i & 2 else 1, -1 if i & 4 else 1])
        index = np.where(flips < 0, dims - 1, 0)
        corners.append(matrix @ index + affine[:3, 3])
        flip_sets.append(flips)
    corners = np.array(corners, np.float32).astype(float)  # dcm2niix works in single precision
    lowest = corners.min(axis=0)
    nearest = int(np.argmin(np.linalg.norm(corners - lowest, axis=1)))
    orient = _best_orient(matrix, flip_sets[nearest])
    if orient is None:
        return data, grid
    # setOrientVec: output axis j takes input axis i (reversed when negative)
    source = [int(np.flatnonzero(orient[:, j])[0]) for j in range(3)]
    if source == [0, 1, 2] and np.all(np.diag(orient) > 0):
        return data, grid
    xyz = np.transpose(data, (2, 1, 0))  # numpy (z, y, x) -> (x, y, z)
    xyz = np.transpose(xyz, source)
    for j in range(3):
        if orient[source[j], j] < 0:
            xyz = np.flip(xyz, axis=j)
    out = np.transpose(xyz, (2, 1, 0))
    new_matrix = matrix @ orient
    new_origin_ras = corners[nearest]
    spacing = np.linalg.norm(new_matrix, axis=0)
    direction = LPS_TO_RAS @ (new_matrix / spacing)
    return out, Grid(LPS_TO_RAS @ new_origin_ras, direction, spacing)


def dcm2niix_order(data: np.ndarray, grid: Grid, *, acquisition_3d: bool, rgb: bool) -> tuple[np.ndarray, Grid]:
    """The array and grid dcm2niix writes for this volume (see the module docstring)."""
    spatial = data.ndim - (1 if rgb else 0)
    slices = data.shape[_spatial_axes(data, rgb)[2]]
    if acquisition_3d and slices > 1 and spatial == 3:
        if rgb:  # nii_setOrtho leaves 24-bit RGB as it is, and then nothing is flipped either
            return data, grid
        return to_ortho(data, grid)
    return flip_rows(data, grid, rgb)
