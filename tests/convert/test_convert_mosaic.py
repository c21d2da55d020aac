"""Siemens mosaics: tiles split into slices, placed and ordered as dcm2niix does.

Mosaics are generated here (tiles + a CSA2 header with NumberOfImagesInMosaic, SliceNormalVector and
MosaicRefAcqTimes) in the three planes with 35 and 36 slices; each conversion is checked against the
geometry the construction implies and against dcm2niix run on the same files. Where
../shared/data/dicom-qa exists, all its series are checked against dcm2niix's own outputs (Ref/).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convert_fixtures.mosaic import (csa2_header, expected_data, expected_geometry, make_mosaic_series, read_ours,
                                     slice_times_ms)
from convert_fixtures.reference import compare, compare_sidecars, dcm2niix_binary, run_dcm2niix
from mmar.convert.cli import main

QA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom-qa"


def convert(folder: Path, out: Path, *extra: str) -> Path:
    assert main(["-q", "-d", str(folder), "-o", str(out), *extra]) == 0
    (output,) = sorted(out.glob("*.nii.gz"))
    return output


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("slices", [35, 36])
def test_mosaic_is_split_and_placed_as_constructed(tmp_path, plane, slices):
    make_mosaic_series(tmp_path / "in", slices=slices, plane=plane, order="int")
    affine, data = read_ours(convert(tmp_path / "in", tmp_path / "out"))
    assert data.shape == (6, 8, slices, 2)  # tile columns, tile rows, slices, volumes
    np.testing.assert_allclose(affine, expected_geometry(slices, plane), atol=1e-3)
    assert np.array_equal(data, expected_data(slices, 2))


def test_mosaic_series_reports_its_time_step(tmp_path):
    import nibabel as nib

    make_mosaic_series(tmp_path / "in", slices=35, tr_ms=2500.0)
    header = nib.load(str(convert(tmp_path / "in", tmp_path / "out"))).header
    assert header["pixdim"][4] == pytest.approx(2.5)


@pytest.mark.skipif(dcm2niix_binary() is None, reason="dcm2niix (PyPI wheel) not installed")
@pytest.mark.parametrize("plane,slices,order", [("axial", 35, "asc"), ("coronal", 36, "desc"),
                                                ("sagittal", 35, "int"), ("sagittal", 36, "asc")])
def test_generated_mosaic_matches_dcm2niix(tmp_path, plane, slices, order):
    make_mosaic_series(tmp_path / "in", slices=slices, plane=plane, order=order)
    ours = convert(tmp_path / "in", tmp_path / "ours", "-b")
    (reference,) = run_dcm2niix(tmp_path / "in", tmp_path / "ref", sidecar=True)
    compare(ours, reference)
    ours_json = json.loads(ours.with_name(ours.name.replace(".nii.gz", ".json")).read_text())
    ref_json = json.loads(reference.with_name(reference.name.replace(".nii.gz", ".json")).read_text())
    expected = [t / 1000 for t in slice_times_ms(slices, order, 2000.0)]
    np.testing.assert_allclose(ours_json["SliceTiming"], expected, atol=1e-4)
    np.testing.assert_allclose(ours_json["SliceTiming"], ref_json["SliceTiming"], atol=1e-4)
    compare_sidecars(ours, reference)  # every other field both write


def test_mosaic_without_slice_count_fails_naming_the_field(tmp_path, capsys):
    import pydicom

    (path, *_) = make_mosaic_series(tmp_path / "in", slices=35, volumes=1)
    ds = pydicom.dcmread(path)
    ds[0x0029, 0x1010].value = csa2_header({"SliceNormalVector": ("FD", [0.0, 0.0, 1.0])})
    ds.save_as(path)
    assert main(["-q", "-d", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "NumberOfImagesInMosaic" in out and path.name in out
    assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True


def qa_series() -> list[Path]:
    if not (QA / "Ref").is_dir():
        return []
    # the series folders: those holding files and no further folders
    return sorted({p.parent for p in (QA / "In").rglob("*")
                   if p.is_file() and not any(q.is_dir() for q in p.parent.iterdir())})


def reference_for(folder: Path) -> Path | None:
    """dcm2niix's output for the series in `folder`, found by SeriesNumber in its JSON sidecar."""
    import pydicom

    for path in sorted(folder.iterdir()):
        try:
            number = int(pydicom.dcmread(path, stop_before_pixels=True).SeriesNumber)
            break
        except Exception:
            continue
    else:
        return None
    for sidecar in (QA / "Ref").glob("*.json"):
        if json.loads(sidecar.read_text()).get("SeriesNumber") == number:
            return sidecar.with_suffix(".nii")
    return None


@pytest.mark.skipif(not (QA / "Ref").is_dir(), reason="../shared/data/dicom-qa not present")
@pytest.mark.parametrize("folder", qa_series(), ids=lambda p: p.name)
def test_dicom_qa_mosaics_match_dcm2niix(tmp_path, folder):
    reference = reference_for(folder)
    ours = convert(folder, tmp_path / "ours", "-b")
    if reference is None:  # the multiband JPEG mosaics have no stored reference: run dcm2niix itself
        if dcm2niix_binary() is None:
            pytest.skip("no stored reference and no dcm2niix")
        (reference,) = run_dcm2niix(folder, tmp_path / "ref", sidecar=True)
        ref_json = json.loads(reference.with_name(reference.name.replace(".nii.gz", ".json")).read_text())
    else:
        ref_json = json.loads(reference.with_suffix(".json").read_text())
    compare(ours, reference)
    ours_json = json.loads(ours.with_name(ours.name.replace(".nii.gz", ".json")).read_text())
    shared = set(ours_json) & set(ref_json) - {"ConversionSoftware", "ConversionSoftwareVersion"}
    assert {"Modality", "Manufacturer", "SeriesDescription", "RepetitionTime", "EchoTime", "SliceThickness",
            "ImageOrientationPatientDICOM", "SliceTiming"} <= shared
    for key in sorted(shared):
        a, b = ours_json[key], ref_json[key]
        if key == "SliceTiming":  # dcm2niix may take a later volume's times: they differ by Siemens' 2.5 ms step
            np.testing.assert_allclose(a, b, atol=0.0026, err_msg=key)
        elif (isinstance(b, (int, float)) and not isinstance(b, bool)
              or isinstance(b, list) and b and isinstance(b[0], (int, float))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=key)
        else:
            assert a == b, f"{key}: {a!r} != dcm2niix {b!r}"


@pytest.mark.skipif(dcm2niix_binary() is None, reason="dcm2niix (PyPI wheel) not installed")
@pytest.mark.parametrize("plane", ["axial", "sagittal"])
def test_diffusion_mosaic_bval_bvec_match_dcm2niix(tmp_path, plane):
    """A DWI mosaic series: .bval/.bvec beside the image, in dcm2niix's conventions (FSL voxel axes)."""
    s = np.sqrt(0.5)
    diffusion = [(0, None), (1000, (1.0, 0.0, 0.0)), (1000, (0.0, s, s)), (2000, (0.0, 0.0, -1.0))]
    make_mosaic_series(tmp_path / "in", slices=35, plane=plane, volumes=4, diffusion=diffusion)
    ours = convert(tmp_path / "in", tmp_path / "ours", "-b")
    (reference,) = run_dcm2niix(tmp_path / "in", tmp_path / "ref", sidecar=True)
    compare(ours, reference)
    stem = lambda p: p.with_name(p.name.replace(".nii.gz", ""))  # noqa: E731
    ours_bval = np.loadtxt(str(stem(ours)) + ".bval")
    ours_bvec = np.loadtxt(str(stem(ours)) + ".bvec")
    np.testing.assert_allclose(ours_bval, np.loadtxt(str(stem(reference)) + ".bval"))
    np.testing.assert_allclose(ours_bvec, np.loadtxt(str(stem(reference)) + ".bvec"), atol=1e-4)


def test_csa_parser_agrees_with_nibabel(tmp_path):
    """Our CSA reader (only the fields the converter needs) gives what nibabel's full reader gives."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader
    from mmar.convert.mosaic import CSA_FIELDS, parse_csa

    raw = csa2_header({"NumberOfImagesInMosaic": ("US", [36]), "Other": ("LO", ["x", "y"]),
                       "SliceNormalVector": ("FD", [0.0, -0.1, 0.99]), "B_value": ("IS", [1000]),
                       "MosaicRefAcqTimes": ("FD", [0.0, 52.5, 105.0])})
    theirs = {k: v["items"] for k, v in csareader.read(raw)["tags"].items() if k in CSA_FIELDS and v["items"]}
    assert parse_csa(raw) == theirs
    assert parse_csa(raw)["NumberOfImagesInMosaic"] == [36]
