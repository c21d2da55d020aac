"""One conversion job (a DICOM series or one image file) -> one output file. Runs in a worker process.

A job never raises: it returns a Result (converted / skipped / failed with the reason), so one bad series
cannot stop the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Options:
    spacing: tuple[float, float, float] | None  # -r, None = keep
    label: bool  # -l
    force: bool  # -f
    sidecar: bool = False  # -b: BIDS JSON (+ .bval/.bvec for diffusion) beside each DICOM conversion


@dataclass
class Job:
    label: str  # what the user reads in messages (folder + series, or the file)
    target: Path
    series: object | None = None  # discover.Series for DICOM
    source: Path | None = None  # an image file (NIfTI / MHA)
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    label: str
    status: str  # converted | skipped | failed
    target: str
    messages: list[str]
    seconds: float = 0.0
    shape: tuple = ()


def run_job(job: Job, options: Options) -> Result:
    from mmar.convert import write

    start = time.perf_counter()
    messages = list(job.notes)
    present = write.existing(job.target)
    if present and not options.force:
        return Result(job.label, "skipped", str(job.target),
                      messages + [f"output exists: {present[0]} (use -f to overwrite)"])
    try:
        geometry = None
        if job.series is not None:
            volume, more, geometry = _dicom_volume(job, options)
            if _writes_directly(job.target, options, volume):
                data, grid, step, rgb = volume
                write.write_nifti(data, grid.ras_affine(), job.target, step, rgb)
                shape = tuple(reversed(data.shape[: data.ndim - (1 if rgb else 0)]))
            else:
                image = _finish(_to_image(*volume), options)
                _write(image, job.target)
                shape = tuple(image.GetSize())
        else:
            image, more = _file_image(job, options)
            _write(image, job.target)
            shape = tuple(image.GetSize())
        messages += more
        if options.sidecar and geometry is not None:
            _write_sidecars(job, geometry)
    except Exception as error:  # SeriesError, decoding, writing: the message names the file at fault
        return Result(job.label, "failed", str(job.target), messages + [str(error) or type(error).__name__],
                      time.perf_counter() - start)
    return Result(job.label, "converted", str(job.target), messages, time.perf_counter() - start, shape)


def _write(image, target: Path) -> None:
    """A SimpleITK image -> the target; RGB (3 x uint8) into NIfTI as RGB24, as dcm2niix writes it (SimpleITK
    would write a 3-vector of uint8 as a 5D vector image)."""
    from mmar.convert import write

    if _is_rgb(image) and target.name.lower().endswith((".nii", ".nii.gz")):
        import SimpleITK as sitk

        from mmar.convert import layout

        dims = 3  # a 4D image: time is the 4th axis, the grid is the first three
        origin = np.asarray(image.GetOrigin(), float)[:dims]
        spacing = np.asarray(image.GetSpacing(), float)[:dims]
        direction = np.asarray(image.GetDirection(), float).reshape(image.GetDimension(), -1)[:dims, :dims]
        step = image.GetSpacing()[3] if image.GetDimension() == 4 else 1.0
        grid = layout.Grid(origin, direction, spacing)
        write.write_nifti(sitk.GetArrayFromImage(image), grid.ras_affine(), target, step, rgb=True)
        return
    write.write_image(image, target)


def _is_rgb(image) -> bool:
    import SimpleITK as sitk

    return image.GetNumberOfComponentsPerPixel() == 3 and image.GetPixelID() == sitk.sitkVectorUInt8


def _finish(image, options: Options):
    """Resample (-r) and type labels; a 4D image is processed volume by volume. RGB stays RGB: each channel
    is interpolated, then rounded back to uint8 (dcm2niix keeps RGB24; a float vector image is not a colour
    image any viewer shows)."""
    from mmar.convert import resample

    if options.spacing is None and not options.label:
        return image
    step = image.GetSpacing()[3] if image.GetDimension() == 4 else 1.0
    volumes = resample.split_volumes(image)
    if options.spacing is not None:
        rgb = _is_rgb(image)
        volumes = [resample.resample(v, options.spacing, options.label) for v in volumes]
        if rgb and not options.label:
            volumes = [_to_uint8(v) for v in volumes]
    if options.label:
        volumes = [resample.as_label(v) for v in volumes]
    return resample.join_volumes(volumes, step) if len(volumes) > 1 else volumes[0]


def _dicom_volume(job: Job, options: Options):
    """A DICOM series -> ((array, grid, time step, rgb) in dcm2niix's voxel order, warnings, (grid, plan))."""
    from mmar.convert import dicom, layout

    slices = job.series.slices
    plan = dicom.plan_volume(slices)
    data = dicom.read_volume(plan, label=options.label)
    rgb = slices[0].samples > 1
    grid = layout.Grid(np.asarray(plan.origin, float), np.asarray(plan.direction, float),
                       np.asarray(plan.spacing, float))
    if plan.shear is not None:  # gantry tilt: resample onto the orthogonal grid first, on the DICOM grid
        data = _untilt(data, grid, plan.shear, rgb, options.label)
    data = _narrow_unsigned(data)
    data, grid = layout.dcm2niix_order(data, grid, acquisition_3d=slices[0].acquisition_3d, rgb=rgb)
    # 4D: the time step is the repetition time in seconds (pixdim[4]), as dcm2niix writes it
    step = slices[0].repetition_ms / 1000.0 if slices[0].repetition_ms > 0 else 1.0
    return (data, grid, step, rgb), plan.warnings, (grid, plan)


def _writes_directly(target: Path, options: Options, volume) -> bool:
    """NIfTI output with nothing to resample: written straight from numpy (no SimpleITK round trip)."""
    data, _grid, _step, rgb = volume
    name = target.name.lower()
    return (name.endswith((".nii", ".nii.gz")) and options.spacing is None and not options.label
            and (not rgb or data.dtype == np.uint8))


def _to_uint8(image):
    """A resampled colour image (float vector) back to 3 x uint8: rounded, clipped to 0..255."""
    import SimpleITK as sitk

    array = np.clip(np.rint(sitk.GetArrayViewFromImage(image)), 0, 255).astype(np.uint8)
    out = sitk.GetImageFromArray(array, isVector=True)
    out.CopyInformation(image)
    return out


def _to_image(data, grid, step, rgb):
    from mmar.convert import resample

    spatial_dims = data.ndim - (1 if rgb else 0)
    volumes = [data] if spatial_dims == 3 else list(data)
    images = [resample.to_image(v, grid.origin, grid.spacing, grid.direction, rgb) for v in volumes]
    return resample.join_volumes(images, step)


def _write_sidecars(job: Job, geometry) -> None:
    """-b: the BIDS JSON from the first image's header; .bval/.bvec when the volumes carry b-values."""
    from mmar import __version__
    from mmar.convert import sidecar
    from mmar.convert.header import import_pydicom

    pydicom = import_pydicom()

    grid, plan = geometry
    first = plan.stack[0][0]
    ds = pydicom.dcmread(first.path, stop_before_pixels=True)

    def header_of(volume):
        return ds if volume[0].path == first.path else pydicom.dcmread(volume[0].path, stop_before_pixels=True)

    json_path, bval_path, bvec_path = sidecar.sidecar_paths(job.target)
    sidecar.write_json(json_path, sidecar.bids_sidecar(ds, _slice_timing(plan, header_of), __version__))
    if sidecar.diffusion(ds) is None:  # not a diffusion series: no other header needs reading
        return
    entries = [sidecar.diffusion(header_of(volume)) for volume in plan.stack]
    if all(entry is not None for entry in entries) and any(entry[0] > 0 for entry in entries):
        row, col = np.asarray(first.orientation[:3], float), np.asarray(first.orientation[3:], float)
        against = first.normal is not None and float(np.dot(np.cross(row, col), first.normal)) < 0
        determinant = float(np.linalg.det(grid.ras_affine()[:3, :3]))
        bval, bvec = sidecar.bvals_bvecs(entries, grid.direction, determinant, against)
        sidecar.write_text(bval_path, bval)
        sidecar.write_text(bvec_path, bvec)


def _slice_timing(plan, header_of) -> list[float] | None:
    """SliceTiming (s) of a mosaic series: the first volume's times, as dcm2niix takes them, unless they are
    impossible (beyond the repetition time: some Siemens multiband versions write wrong times into the
    first volume), then those of the next volume that has possible ones."""
    from mmar.convert import mosaic

    first = plan.stack[0][0]
    if not first.mosaic:
        return None
    tr = first.repetition_ms / 1000.0
    timing = None
    for volume in plan.stack[:3]:
        times = mosaic.slice_times(mosaic.csa_image_tags(header_of(volume)), first.mosaic[0])
        timing = timing or times
        if times and (tr <= 0 or all(0 <= t < tr for t in times)):
            return times
    return timing


def _untilt(data: np.ndarray, grid, shear, rgb: bool, label: bool) -> np.ndarray:
    """Gantry tilt: each volume resampled onto the orthogonal grid (SimpleITK), back as numpy."""
    import SimpleITK as sitk

    from mmar.convert import resample

    spatial_dims = data.ndim - (1 if rgb else 0)
    volumes = [data] if spatial_dims == 3 else list(data)
    out = []
    for volume in volumes:
        image = resample.to_image(volume, grid.origin, grid.spacing, grid.direction, rgb)
        out.append(sitk.GetArrayFromImage(resample.correct_tilt(image, shear, label)))
    return out[0] if spatial_dims == 3 else np.stack(out)


def _narrow_unsigned(data: np.ndarray) -> np.ndarray:
    """uint16 that fits int16 is written as int16 (dcm2niix's nii_check16bitUnsigned): same values, same type."""
    if data.dtype == np.uint16 and (data.size == 0 or int(data.max()) <= np.iinfo(np.int16).max):
        return data.astype(np.int16)
    return data


def _file_image(job: Job, options: Options):
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(job.source))
    except RuntimeError as error:
        raise ValueError(f"cannot read {job.source.name}: {str(error).strip().splitlines()[-1]}") from None
    if image.GetDimension() not in (3, 4):
        raise ValueError(f"{job.source.name}: {image.GetDimension()}D image, expected 3D or 4D")
    if options.label and image.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError(f"{job.source.name}: a label mask must have one component per voxel")
    return _finish(image, options), []


def spacing_of(values: list[float] | None) -> tuple[float, float, float] | None:
    if not values:
        return None
    spacing = tuple(float(v) for v in (values * 3 if len(values) == 1 else values))
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError("-r takes one or three positive numbers (mm)")
    return spacing
