"""What dcm2niix users expect beside the image (`-b`): a BIDS JSON sidecar, and .bval/.bvec for diffusion.

Field names, units and formats follow dcm2niix's sidecars (times in seconds, manufacturer names shortened
as dcm2niix does, ImageOrientationPatientDICOM as stored, SliceTiming in the order of the written slices).
b-vectors are given along the written voxel axes, with x negated when the affine's determinant is
positive (FSL's convention, which dcm2niix's .bvec files follow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# dcm2niix's short manufacturer names (nii_dicom.cpp dcmStrManufacturer)
# by the first two letters, as dcm2niix tells them apart; others are written as the header has them
MANUFACTURERS = {"SI": "Siemens", "GE": "GE", "HI": "Hitachi", "PH": "Philips", "TO": "Toshiba", "CA": "Canon",
                 "UI": "UIH", "BR": "Bruker"}

# (BIDS name, DICOM keyword, kind): kind s = string, f = number, i = integer, ms = ms -> s, l = list,
# j = multiple values in one string (backslash-separated, as in the DICOM header), m = manufacturer
FIELDS = [
    ("Modality", "Modality", "s"), ("MagneticFieldStrength", "MagneticFieldStrength", "f"),
    ("ImagingFrequency", "ImagingFrequency", "f"), ("Manufacturer", "Manufacturer", "m"),
    ("ManufacturersModelName", "ManufacturerModelName", "s"), ("InstitutionName", "InstitutionName", "s"),
    ("InstitutionalDepartmentName", "InstitutionalDepartmentName", "s"),
    ("InstitutionAddress", "InstitutionAddress", "s"), ("DeviceSerialNumber", "DeviceSerialNumber", "s"),
    ("StationName", "StationName", "s"), ("BodyPartExamined", "BodyPartExamined", "s"),
    ("PatientPosition", "PatientPosition", "s"), ("SoftwareVersions", "SoftwareVersions", "s"),
    ("MRAcquisitionType", "MRAcquisitionType", "s"), ("StudyDescription", "StudyDescription", "s"),
    ("SeriesDescription", "SeriesDescription", "s"), ("ProtocolName", "ProtocolName", "s"),
    ("ScanningSequence", "ScanningSequence", "j"), ("SequenceVariant", "SequenceVariant", "j"),
    ("ScanOptions", "ScanOptions", "j"), ("SequenceName", "SequenceName", "s"), ("ImageType", "ImageType", "l"),
    ("SeriesNumber", "SeriesNumber", "i"), ("AcquisitionNumber", "AcquisitionNumber", "i"),
    ("SliceThickness", "SliceThickness", "f"), ("SpacingBetweenSlices", "SpacingBetweenSlices", "f"),
    ("SAR", "SAR", "f"), ("EchoTime", "EchoTime", "ms"), ("RepetitionTime", "RepetitionTime", "ms"),
    ("InversionTime", "InversionTime", "ms"), ("FlipAngle", "FlipAngle", "f"),
    ("PixelBandwidth", "PixelBandwidth", "f"), ("ConvolutionKernel", "ConvolutionKernel", "j"),
    ("KVP", "KVP", "f"), ("XRayExposure", "Exposure", "f"), ("ExposureTime", "ExposureTime", "ms"),
]


def _value(ds, keyword: str, kind: str):
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        if kind == "s":
            return str(value).strip()
        if kind == "m":
            text = str(value).strip()
            return MANUFACTURERS.get(text[:2].upper(), text)
        if kind == "f":
            return float(value)
        if kind == "i":
            return int(value)
        if kind == "ms":
            return float(value) / 1000.0
        values = [str(v).strip() for v in (value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__")
                                             and not isinstance(value, str) else [value])]
        return values if kind == "l" else "\\".join(values)  # dcm2niix keeps DICOM's backslash
    except (TypeError, ValueError):
        return None  # an unparsable optional field is left out, as dcm2niix leaves it out


def _acquisition_time(ds) -> str | None:
    """HHMMSS.ffffff -> dcm2niix's 'HH:MM:S.ffffff' (seconds not zero-padded, as dcm2niix prints them)."""
    text = str(ds.get("AcquisitionTime", "") or "").strip()
    if len(text) < 6 or not text[:6].isdigit():
        return None
    seconds = float(text[4:]) if text[4:] else 0.0
    return f"{int(text[:2]):02d}:{int(text[2:4]):02d}:{seconds:02.6f}"


def bids_sidecar(ds, slice_timing: list[float] | None, version: str) -> dict:
    """The BIDS JSON fields dcm2niix writes that the header holds (pure)."""
    out: dict = {}
    for name, keyword, kind in FIELDS:
        value = _value(ds, keyword, kind)
        if value is not None and value != "" and value != []:
            out[name] = value
    image_type = out.get("ImageType")
    if image_type:  # dcm2niix spells out Siemens' M/P (magnitude/phase) flags
        for flag, word in (("M", "MAGNITUDE"), ("P", "PHASE")):
            if flag in image_type and word not in image_type:
                out["ImageType"] = image_type = [*image_type, word]
    time = _acquisition_time(ds)
    if time is not None:
        out["AcquisitionTime"] = time
    if slice_timing:
        out["SliceTiming"] = slice_timing
    orientation = ds.get("ImageOrientationPatient")
    if orientation is not None:
        out["ImageOrientationPatientDICOM"] = [float(v) for v in orientation]
    out["ConversionSoftware"] = "mmar convert"
    out["ConversionSoftwareVersion"] = version
    return out


def diffusion(ds) -> tuple[float, np.ndarray | None] | None:
    """(b-value, gradient direction in LPS or None) of one image: the standard tags, else Siemens CSA."""
    bvalue = ds.get("DiffusionBValue")
    direction = ds.get("DiffusionGradientOrientation")
    if bvalue is None and (0x0029, 0x1010) in ds:
        from mmar.convert.mosaic import MosaicError, csa_image_tags

        try:
            tags = csa_image_tags(ds)
        except MosaicError:
            return None
        if tags.get("B_value"):
            bvalue = tags["B_value"][0]
            direction = tags.get("DiffusionGradientDirection")
    if bvalue is None:
        return None
    vector = np.asarray([float(v) for v in direction], float) if direction is not None and len(direction) == 3 else None
    return float(bvalue), vector


def bvals_bvecs(entries: list, direction: np.ndarray, affine_det: float, negate: bool = False) -> tuple[str, str]:
    """Per volume (b-value, LPS gradient) -> .bval and .bvec text along the written voxel axes.

    negate: give every vector with the opposite sign (the same diffusion direction), as dcm2niix does for
    Siemens mosaics whose slice normal points against row x column (sagittal)."""
    bvals, vectors = [], []
    for bvalue, gradient in entries:
        bvals.append(bvalue)
        if gradient is None or bvalue == 0 or not np.any(gradient):
            vectors.append(np.zeros(3))
            continue
        along = direction.T @ (gradient / np.linalg.norm(gradient))
        if affine_det > 0:
            along[0] = -along[0]
        vectors.append(-along if negate else along)
    fmt = lambda v: f"{v:.6g}".replace("-0", "-0") if abs(v) >= 5e-7 else "0"  # noqa: E731
    bval = " ".join(f"{b:g}" for b in bvals) + "\n"
    bvec = "".join(" ".join(fmt(v[i]) for v in vectors) + "\n" for i in range(3))
    return bval, bvec


def write_text(path: Path, text: str) -> None:
    from mmar.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: Path, fields: dict) -> None:
    write_text(path, json.dumps(fields, indent="\t") + "\n")


def sidecar_paths(target: Path) -> tuple[Path, Path, Path]:
    """OUT/name.nii.gz -> OUT/name.json, name.bval, name.bvec."""
    name = target.name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return target.with_name(name + ".json"), target.with_name(name + ".bval"), target.with_name(name + ".bvec")
