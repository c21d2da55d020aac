"""`mmar convert`: flags, naming, overwrite rules, bad input, resampling, geometry corner cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from convert_fixtures.series import make_series, pydicom_file, set_pixels
from mmar.convert.cli import main


def run(tmp_path, *args) -> int:
    return main(["-q", *map(str, args)])


# ---------------------------------------------------------------- bad input, messages, exit codes
def test_bad_inputs_get_messages_and_good_series_still_convert(tmp_path, capsys):
    root = tmp_path / "in"
    make_series(pydicom_file("MR_small.dcm"), root / "good", count=3)
    (root / "sr").mkdir()
    (root / "sr" / "report.dcm").write_bytes(pydicom_file("reportsi.dcm").read_bytes())
    (root / "trunc").mkdir()
    (root / "trunc" / "cut.dcm").write_bytes(pydicom_file("MR_truncated.dcm").read_bytes())
    (root / "junk.dcm").write_bytes(b"not dicom at all" * 10)
    (root / "notes.txt").write_text("ignored")
    code = main(["-q", "-d", str(root), "-o", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert code == 1
    assert "not an image: structured report" in text
    assert "truncated pixel data" in text and "cut.dcm" in text
    assert "junk.dcm: not a readable DICOM file" in text
    assert "summary: 1 converted, 1 skipped, 2 failed (1 non-DICOM file(s) ignored)" in text
    assert (tmp_path / "out" / "good.nii.gz").exists()


def _cut_point(data: bytes, where: str) -> int:
    """Where to cut one file of a generated (explicit VR little endian) series."""
    if where == "after the file meta header":  # nothing of the data set is left: its series UID neither
        return 132 + 12 + int.from_bytes(data[140:144], "little")
    if where == "before Rows":  # the series UID is there, the image header is not
        return data.index(b"\x28\x00\x10\x00")
    return data.index(b"\xe0\x7f\x10\x00")  # the whole header, no pixel data


@pytest.mark.parametrize("where", ["after the file meta header", "before Rows", "before the pixel data"])
def test_a_slice_cut_short_fails_its_series_instead_of_being_skipped(tmp_path, capsys, where):
    """A slice that cannot be read is not 'not an image': the series would convert one slice short, with the
    gap interpolated, and exit 0. It fails instead, naming the file, and no volume is written."""
    paths = make_series(pydicom_file("MR_small.dcm"), tmp_path / "in" / "series", count=5)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:_cut_point(data, where)])
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out") == 1
    text = capsys.readouterr().out
    assert f"series/{paths[2].name}: image slice cannot be read" in text
    assert "not an image" not in text and "missing slices" not in text
    assert "0 converted, 0 skipped, 2 failed" in text  # the file, and its series not converted
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_files_that_are_not_images_are_still_skipped(tmp_path, capsys):
    import pydicom

    root = tmp_path / "in"
    make_series(pydicom_file("MR_small.dcm"), root / "mr", count=3)
    (root / "mr" / "DICOMDIR").write_bytes(pydicom_file("DICOMDIR").read_bytes())
    (root / "mr" / "report.dcm").write_bytes(pydicom_file("reportsi.dcm").read_bytes())
    (root / "mr" / "README").write_text("scanner export, see the PACS\n")
    csa = pydicom.dcmread(pydicom_file("reportsi.dcm"))  # a private non-image object, like Siemens' CSA files
    csa.SOPClassUID = csa.file_meta.MediaStorageSOPClassUID = "1.3.12.2.1107.5.9.1"
    csa.Modality = "MR"
    csa.save_as(root / "mr" / "csa.dcm", enforce_file_format=True)
    assert run(tmp_path, "-d", root, "-o", tmp_path / "out") == 0
    text = capsys.readouterr().out
    assert "mr/DICOMDIR: not an image: DICOMDIR (media directory)" in text
    assert "mr/report.dcm: not an image: structured report" in text
    assert "mr/csa.dcm: not an image: private SOP class 1.3.12.2.1107.5.9.1 without an image header" in text
    assert "summary: 1 converted, 3 skipped, 0 failed (1 non-DICOM file(s) ignored)" in text
    assert sitk.ReadImage(str(tmp_path / "out" / "mr.nii.gz")).GetSize() == (64, 64, 3)


def test_folder_without_dicom_is_an_error(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no images here")
    assert main(["-d", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: -d") and "no DICOM files found" in err


def test_missing_input_folder_is_an_error(tmp_path, capsys):
    assert main(["-d", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_an_error_is_the_step_result_the_operator_reads(tmp_path, monkeypatch, capsys):
    """The termination message carries the error line itself, not a log tail that may end elsewhere."""
    import json

    from mmar import results

    log = tmp_path / "termination-log"
    monkeypatch.setenv("MMAR_TERMINATION_LOG", str(log))
    assert main(["-d", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 1
    message = json.loads(log.read_text())
    assert message["command"] == "convert" and "not a folder" in message["error"]
    assert results.error_line(capsys.readouterr().err).endswith(message["error"])


def test_non_image_only_folder_is_skipped_not_failed(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(pydicom_file("reportsi.dcm").read_bytes())
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out") == 0
    assert "0 converted, 1 skipped, 0 failed" in capsys.readouterr().out


def test_missing_slices_are_listed_and_filled_on_a_true_grid(tmp_path, capsys):
    def ramp(ds, k):
        set_pixels(ds, np.full((int(ds.Rows), int(ds.Columns)), 10 * k))

    # positions 0, 2, 4, (6 missing), 8 mm; slice k holds value 10*k
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in", positions=[0, 2, 4, 8], pixel_fn=ramp)
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "missing slices at 1 position(s)" in out and "12.64" in out  # 6.6406 (origin z) + 6 mm
    image = sitk.ReadImage(str(tmp_path / "out" / "in.nii.gz"))
    assert image.GetSize()[2] == 5 and image.GetSpacing()[2] == pytest.approx(2.0)
    values = sitk.GetArrayFromImage(image)[:, 0, 0]
    np.testing.assert_allclose(values, [0, 10, 20, 25, 30])  # the gap is interpolated between its neighbours


def test_uneven_spacing_warns_and_positions_stay_true(tmp_path, capsys):
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in", positions=[0, 1, 2, 3.5, 5, 6])
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out") == 0
    assert "uneven slice spacing" in capsys.readouterr().out
    image = sitk.ReadImage(str(tmp_path / "out" / "in.nii.gz"))
    last = image.TransformIndexToPhysicalPoint((0, 0, image.GetSize()[2] - 1))
    assert last[2] == pytest.approx(6.6406 + 6, abs=1e-3)  # the last slice stays where it was


def test_unequal_images_per_position_is_refused(tmp_path, capsys):
    uid = "1.2.826.0.1.3680043.8.498.77"
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in" / "a", count=3, series_uid=uid)
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in" / "b", count=2, series_uid=uid)
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out") == 1
    assert "cannot form a volume" in capsys.readouterr().out


def test_gantry_tilt_is_corrected(tmp_path, capsys):
    """Slice origins drift +1 pixel along the row per slice; the marker drifts -1 pixel, so it is one
    straight line along the normal in space: after correction it sits in one column on every slice."""
    def marker(ds, k):
        image = np.zeros((int(ds.Rows), int(ds.Columns)), dtype=np.int16)
        image[30, 40 - k] = 1000
        set_pixels(ds, image)

    paths = make_series(pydicom_file("MR_small.dcm"), tmp_path / "in", count=5, step=2.0,
                        inplane_drift=(0.3125, 0.0), pixel_fn=marker)
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out") == 0
    assert "gantry tilt" in capsys.readouterr().out
    image = sitk.ReadImage(str(tmp_path / "out" / "in.nii.gz"))
    data = sitk.GetArrayFromImage(image)
    # where DICOM row 30, column 40 of the first slice lies in the written (dcm2niix-ordered) grid
    first = pydicom.dcmread(min(paths, key=lambda p: float(pydicom.dcmread(p).SliceLocation)))
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    spacing = [float(v) for v in first.PixelSpacing]
    point = (np.array([float(v) for v in first.ImagePositionPatient]) + 40 * spacing[1] * iop[:3]
             + 30 * spacing[0] * iop[3:])
    x, y, _ = image.TransformPhysicalPointToIndex(tuple(point))
    for z in range(5):
        assert np.unravel_index(np.argmax(data[z]), data[z].shape) == (y, x)


# ---------------------------------------------------------------- names, overwrite, formats
def test_series_grouped_by_uid_not_folder_with_stable_unique_names(tmp_path):
    root = tmp_path / "in"
    make_series(pydicom_file("MR_small.dcm"), root / "study", count=3, series_number=3)
    make_series(pydicom_file("CT_small.dcm"), root / "study", count=2, series_number=5)
    assert run(tmp_path, "-d", root, "-o", tmp_path / "out") == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["study_s3.nii.gz", "study_s5.nii.gz"]
    assert sitk.ReadImage(str(tmp_path / "out" / "study_s3.nii.gz")).GetSize()[2] == 3


def test_existing_output_is_never_touched_without_force(tmp_path, capsys):
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in", count=3)
    target = tmp_path / "out" / "in.nii.gz"
    target.parent.mkdir()
    target.write_bytes(b"precious")
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out") == 1
    assert "output exists" in capsys.readouterr().out and target.read_bytes() == b"precious"
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out", "-f") == 0
    assert sitk.ReadImage(str(target)).GetSize() == (64, 64, 3)
    assert sorted(p.name for p in target.parent.iterdir()) == ["in.nii.gz"]  # no temp files left


@pytest.mark.parametrize("ext", [".nii", ".mha", ".mhd"])
def test_output_formats(tmp_path, ext):
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in", count=3)
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out", "-e", ext) == 0
    image = sitk.ReadImage(str(tmp_path / "out" / f"in{ext}"))
    assert image.GetSize() == (64, 64, 3)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- resampling (-r, -l), NIfTI/MHA in
def write_nifti(path: Path, array: np.ndarray, spacing, origin=(10.0, -20.0, 5.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection((0, -1, 0, 1, 0, 0, 0, 0, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_resample_image_keeps_extent_and_direction(tmp_path):
    rng = np.random.default_rng(0)
    write_nifti(tmp_path / "in" / "sub" / "a.nii.gz", rng.normal(size=(10, 20, 16)).astype(np.float32), (0.5, 0.8, 2.5))
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out", "-s", ".nii.gz", "-r", "1") == 0
    src = sitk.ReadImage(str(tmp_path / "in" / "sub" / "a.nii.gz"))
    out = sitk.ReadImage(str(tmp_path / "out" / "sub" / "a.nii.gz"))
    assert out.GetSpacing() == pytest.approx((1, 1, 1))
    assert out.GetSize() == (8, 16, 25)  # 16*0.5, 20*0.8, 10*2.5 mm
    assert out.GetDirection() == pytest.approx(src.GetDirection())
    # the outer corner of the first voxel stays put
    corner = lambda im: np.array(im.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5)))
    np.testing.assert_allclose(corner(out), corner(src), atol=1e-4)
    assert out.GetPixelID() == sitk.sitkFloat32


def test_resample_anisotropic_three_values_and_mha_input(tmp_path):
    write_nifti(tmp_path / "in" / "a.mha", np.ones((6, 8, 8), np.int16), (1.0, 1.0, 3.0))
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out", "-s", ".mha", "-e", ".nii.gz",
               "-r", "0.5", "2", "1.5") == 0
    out = sitk.ReadImage(str(tmp_path / "out" / "a.nii.gz"))
    assert out.GetSize() == (16, 4, 12)
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), 1.0)


def test_label_resampling_keeps_only_label_values_and_integer_type(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 3, 7], size=(9, 21, 17)).astype(np.float32)  # stored as float on purpose
    write_nifti(tmp_path / "in" / "seg.nii.gz", labels, (0.7, 0.9, 2.2))
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out", "-s", ".nii.gz", "-r", "1", "-l") == 0
    out = sitk.ReadImage(str(tmp_path / "out" / "seg.nii.gz"))
    assert out.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 3, 7}


def test_label_with_fractional_values_fails_clearly(tmp_path, capsys):
    write_nifti(tmp_path / "in" / "prob.nii.gz", np.full((4, 4, 4), 0.5, np.float32), (1, 1, 1))
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "out", "-s", ".nii.gz", "-l") == 1
    assert "non-integer values" in capsys.readouterr().out


def test_bad_resolution_is_an_error(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["-d", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-r", "1", "2"]) == 1
    assert "one or three positive numbers" in capsys.readouterr().err


def test_parallel_workers_give_the_same_files(tmp_path):
    for i in range(3):
        make_series(pydicom_file("MR_small.dcm"), tmp_path / "in" / f"s{i}", count=3)
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "serial", "-j", "1") == 0
    assert run(tmp_path, "-d", tmp_path / "in", "-o", tmp_path / "parallel", "-j", "2") == 0
    for path in sorted((tmp_path / "serial").iterdir()):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "parallel" / path.name)))
        assert np.array_equal(a, b)


def test_console_script_and_mmar_command(tmp_path):
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in", count=2)
    bindir = Path(sys.executable).parent
    alias = bindir / "nvmidl-dataconvert"
    if not alias.exists():
        pytest.skip("console scripts not installed (pip install -e .)")
    done = subprocess.run([str(alias), "-d", str(tmp_path / "in"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "summary: 1 converted" in done.stdout
    again = subprocess.run([str(bindir / "mmar"), "convert", "-d", str(tmp_path / "in"), "-o", str(tmp_path / "out")],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "output exists" in again.stdout
    missing = subprocess.run([str(alias), "-d", str(tmp_path / "none"), "-o", str(tmp_path / "out")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.startswith("error: -d")

