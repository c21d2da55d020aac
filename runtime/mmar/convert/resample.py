"""Array + grid -> SimpleITK image, gantry-tilt correction and resampling to a new voxel size (SimpleITK)."""

from __future__ import annotations

import numpy as np


def to_image(data: np.ndarray, origin, spacing, direction, rgb: bool = False):
    """(z, y, x[, c]) numpy array + LPS geometry -> SimpleITK image (vector pixels when rgb)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(data), isVector=rgb)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in np.asarray(direction, float).ravel()))
    return image


def join_volumes(images: list, step: float = 1.0):
    """3D volumes -> one 4D image (time as the 4th axis, `step` seconds apart: dcm2niix's pixdim[4] = TR)."""
    import SimpleITK as sitk

    return images[0] if len(images) == 1 else sitk.JoinSeries(images, 0.0, float(step))


def split_volumes(image) -> list:
    """A 4D image -> its 3D volumes (a 3D image -> [itself])."""
    import SimpleITK as sitk

    if image.GetDimension() != 4:
        return [image]
    size = list(image.GetSize())
    return [sitk.Extract(image, size[:3] + [0], [0, 0, 0, t]) for t in range(size[3])]


def _interpolator(label: bool):
    import SimpleITK as sitk

    return sitk.sitkNearestNeighbor if label else sitk.sitkLinear


def correct_tilt(image, shear: np.ndarray, label: bool):
    """Resample a gantry-tilted stack onto the orthogonal grid it was labelled with.

    Stored slice k really lies at origin + k*dz*n + k*dz*shear (shear: in-plane mm per mm along n).
    The image carries the orthogonal geometry, so the true place of its voxel q is T(q) = q + ((q-o).n) shear;
    resampling onto the same grid, reading each true output point o at T^-1(o) = o - ((o-origin).n) shear
    (matrix I - shear n^T centred on the origin), puts every voxel where it belongs.
    """
    import SimpleITK as sitk

    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    normal = direction[:, 2]
    transform = sitk.AffineTransform(3)
    transform.SetCenter(image.GetOrigin())
    transform.SetMatrix(tuple((np.eye(3) - np.outer(shear, normal)).ravel()))
    fill = 0 if label else float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, image, transform, _interpolator(label), fill, image.GetPixelID())


def resample(image, spacing: tuple[float, float, float], label: bool):
    """Resample to `spacing` (mm, x y z), keeping the physical extent (outer voxel edges) and direction.

    New size = round(extent / spacing); the first voxel's outer corner stays where it was, so the new
    origin (a voxel centre) moves by half the change of voxel size along each axis. Images: linear
    interpolation into float32; labels (-l): nearest neighbour, so only the original label values appear.
    """
    import SimpleITK as sitk

    old_spacing = np.array(image.GetSpacing(), float)
    new_spacing = np.array(spacing, float)
    extent = np.array(image.GetSize(), float) * old_spacing
    size = np.maximum(np.round(extent / new_spacing), 1).astype(int)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), float) + direction @ ((new_spacing - old_spacing) / 2)
    pixel = image.GetPixelID() if label else sitk.sitkFloat32
    if not label and image.GetNumberOfComponentsPerPixel() > 1:
        pixel = sitk.sitkVectorFloat32
    fill = 0.0 if label else float(np.min(sitk.GetArrayViewFromImage(image)))
    return sitk.Resample(image, [int(v) for v in size], sitk.Transform(), _interpolator(label),
                         tuple(origin), tuple(new_spacing), tuple(direction.ravel()), fill, pixel)


def as_label(image):
    """Label masks are written as integers: the smallest integer type holding the values; non-integer values refused."""
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError("label mask holds non-integer values: is it really a label (-l)?")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    for dtype, pixel in ((np.uint8, sitk.sitkUInt8), (np.int16, sitk.sitkInt16), (np.uint16, sitk.sitkUInt16),
                         (np.int32, sitk.sitkInt32)):
        if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return sitk.Cast(image, pixel) if image.GetPixelID() != pixel else image
    raise ValueError(f"label values {lo}..{hi} do not fit a 32-bit integer")
