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
        image, more = _dicom_image(job, options) if job.series is not None else _file_image(job, options)
        messages += more
        write.write_image(image, job.target)
    except Exception as error:  # SeriesError, decoding, writing: the message names the file at fault
        return Result(job.label, "failed", str(job.target), messages + [str(error) or type(error).__name__],
                      time.perf_counter() - start)
    return Result(job.label, "converted", str(job.target), messages, time.perf_counter() - start,
                  tuple(image.GetSize()))


def _finish(image, options: Options):
    """Resample (-r) and type labels; a 4D image is processed volume by volume."""
    from mmar.convert import resample

    volumes = resample.split_volumes(image)
    if options.spacing is not None:
        volumes = [resample.resample(v, options.spacing, options.label) for v in volumes]
    if options.label:
        volumes = [resample.as_label(v) for v in volumes]
    return resample.join_volumes(volumes) if len(volumes) > 1 else volumes[0]


def _dicom_image(job: Job, options: Options):
    from mmar.convert import dicom, resample

    plan = dicom.plan_volume(job.series.slices)
    data = dicom.read_volume(plan, label=options.label)
    rgb = job.series.slices[0].samples > 1
    spatial_dims = data.ndim - (1 if rgb else 0)
    volumes = [data] if spatial_dims == 3 else list(data)
    images = [resample.to_image(v, plan.origin, plan.spacing, plan.direction, rgb) for v in volumes]
    if plan.shear is not None:
        images = [resample.correct_tilt(im, plan.shear, options.label) for im in images]
    image = resample.join_volumes(images)
    return _finish(image, options), plan.warnings


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
