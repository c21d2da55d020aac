"""`mmar convert` / `nvmidl-dataconvert` run as a user runs them (a subprocess): what a run imports, the
output folder inside the input, RGB with -r, the hint for NIfTI input without -s, and the reason of a run
that failed every case in its result (the step's termination message)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from convert_fixtures.series import make_series, pydicom_file


def cli(*args, env: dict | None = None, importtime: bool = False, module: str = "mmar") -> subprocess.CompletedProcess:
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", module]
    command += ["convert"] if module == "mmar" else []
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def loaded_by_run(*args) -> tuple[subprocess.CompletedProcess, set[str]]:
    """A conversion in a fresh interpreter (nvmidl-dataconvert's entry point) -> (the run, the top-level
    packages loaded when it ended). An import that was tried and refused (pydicom's of requests) is no load."""
    code = ("import sys; from mmar.convert.cli import main; code = main(sys.argv[1:]); "
            "print('MODULES:' + ' '.join(sorted({m.split('.')[0] for m, v in sys.modules.items() if v is not None}))); "
            "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    line = [line for line in done.stdout.splitlines() if line.startswith("MODULES:")]
    return done, set(line[0][len("MODULES:"):].split()) if line else set()


def imported(stderr: str) -> set[str]:
    """Top-level packages a `python -X importtime` run imported."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    return names


def make_nifti_inputs(root: Path, count: int = 2) -> None:
    for k in range(count):
        image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) + k)
        image.SetSpacing((2.0, 2.0, 2.0))
        (root / "sub").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(root / "sub" / f"case{k}.nii.gz"))


# ---------------------------------------------------------------- start-up
def test_help_and_a_plain_series_import_neither_torch_monai_nor_pydicom(tmp_path):
    for module in ("mmar", "mmar.convert.cli"):  # `mmar convert` and `nvmidl-dataconvert`
        done = cli("--help", importtime=True, module=module)
        assert done.returncode == 0 and "-d" in done.stdout
        assert not imported(done.stderr) & {"torch", "monai", "pydicom", "numpy"}, module
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in" / "mr", count=4)  # uncompressed: the fast path
    (tmp_path / "in" / "truth.nii.gz").write_bytes(b"\x1f\x8b" + bytes(300))  # files beside them, ignored
    (tmp_path / "in" / "notes.json").write_text("{}")  # without pydicom's say
    done, modules = loaded_by_run("-q", "-d", tmp_path / "in", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 non-DICOM file(s) ignored" in done.stdout, done.stdout
    assert "numpy" in modules and "mmar" in modules  # the check sees imports at all
    assert not modules & {"torch", "monai", "pydicom", "requests", "SimpleITK", "gdcm", "tqdm"}, modules
    assert (tmp_path / "out" / "mr.nii.gz").exists()
    # the same through `mmar convert` (mmar.cli's dispatch), as python -X importtime sees it
    done = cli("-q", "-d", tmp_path / "in", "-o", tmp_path / "out2", importtime=True)
    assert done.returncode == 0, done.stdout + done.stderr
    modules = imported(done.stderr)
    assert "numpy" in modules and not modules & {"torch", "monai", "pydicom", "SimpleITK"}, modules


def test_lossless_compressed_series_import_only_their_codec_not_pydicom(tmp_path):
    """RLE, JPEG-LS and JPEG 2000 lossless are decoded by the codec's own module (mmar.convert.encapsulated):
    a folder of them never imports pydicom, and each series only the one codec it needs."""
    codecs = {"MR_small_RLE.dcm": "rle", "MR_small_jpeg_ls_lossless.dcm": "_libjpeg",
              "MR_small_jp2klossless.dcm": "_openjpeg"}
    for name, codec in codecs.items():
        make_series(pydicom_file(name), tmp_path / codec / "in" / "s", count=3)
        done, modules = loaded_by_run("-q", "-d", tmp_path / codec / "in", "-o", tmp_path / codec / "out")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "summary: 1 converted" in done.stdout, done.stdout
        assert codec in modules, (name, modules)
        others = set(codecs.values()) - {codec}
        assert not modules & {"pydicom", "gdcm", "PIL", "requests", "torch", "monai", *others}, (name, modules)


def test_a_lossy_compressed_series_imports_pydicom_without_requests(tmp_path):
    make_series(pydicom_file("693_J2KI.dcm"), tmp_path / "in" / "j2k", count=3)  # lossy JPEG 2000: pydicom's
    done, modules = loaded_by_run("-q", "-d", tmp_path / "in", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pydicom" in modules and not modules & {"requests", "torch", "monai"}, modules


# ---------------------------------------------------------------- -o inside -d
def test_the_output_folder_inside_the_input_is_never_an_input(tmp_path):
    """`nvmidl-dataconvert -d nif_in -o nif_in/out -s .nii.gz -r 1`, twice (the second with -f): the second
    run converted the first run's outputs again, into nif_in/out/out/sub/..."""
    root = tmp_path / "nif_in"
    make_nifti_inputs(root)
    for extra in ((), ("-f",)):
        done = cli("-q", "-d", root, "-o", root / "out", "-s", ".nii.gz", "-r", "1", *extra, module="mmar.convert.cli")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "summary: 2 converted, 0 skipped, 0 failed" in done.stdout
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.nii.gz"))
    assert written == ["out/sub/case0.nii.gz", "out/sub/case1.nii.gz", "sub/case0.nii.gz", "sub/case1.nii.gz"]
    # the same for DICOM input: the outputs are not counted as ignored files either
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "dcm" / "mr", count=3)
    for extra in ((), ("-f",)):
        done = cli("-q", "-d", tmp_path / "dcm", "-o", tmp_path / "dcm" / "out", *extra)
        assert done.returncode == 0 and "summary: 1 converted, 0 skipped, 0 failed\n" in done.stdout, done.stdout


# ---------------------------------------------------------------- RGB with -r
def _rgb_pixels(ds, k):
    rows, cols = int(ds.Rows), int(ds.Columns)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    for keyword in ("RescaleSlope", "RescaleIntercept", "SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    pixels = np.zeros((rows, cols, 3), np.uint8)
    pixels[...] = (10, 200, 30)
    pixels[: rows // 2, :, 0] = 250  # a red upper half
    ds.PixelData = pixels.tobytes()


def test_rgb_resampled_stays_rgb(tmp_path):
    """-r 1 on an RGB series wrote a float32 5D vector image; RGB24 stays RGB24 (as dcm2niix writes it)."""
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in" / "rgb", count=4, step=2.0, pixel_fn=_rgb_pixels)
    done = cli("-q", "-d", tmp_path / "in", "-o", tmp_path / "out", "-r", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    import nibabel

    image = nibabel.load(tmp_path / "out" / "rgb.nii.gz")
    assert image.header["datatype"] == 128 and image.header["bitpix"] == 24  # NIFTI_TYPE_RGB24
    spacing = image.header.get_zooms()[:3]
    assert np.allclose(spacing, 1.0, atol=1e-4) and image.shape[2] == 8  # 4 slices 2 mm apart -> 8 of 1 mm
    data = np.asarray(image.dataobj)
    middle = data[data.shape[0] // 2, :, image.shape[2] // 2]
    colours = {tuple(int(v) for v in voxel) for voxel in middle}
    assert (10, 200, 30) in colours and (250, 200, 30) in colours
    source = nibabel.load(_convert_plain(tmp_path))  # without -r: the same colours, only more voxels
    assert source.header["datatype"] == 128


def _convert_plain(tmp_path: Path) -> Path:
    done = cli("-q", "-d", tmp_path / "in", "-o", tmp_path / "plain")
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp_path / "plain" / "rgb.nii.gz"


# ---------------------------------------------------------------- NIfTI input without -s
def test_nifti_input_without_s_says_which_s_takes_it(tmp_path):
    make_nifti_inputs(tmp_path / "in", count=3)
    (tmp_path / "in" / "notes.txt").write_text("cases")
    done = cli("-d", tmp_path / "in", "-o", tmp_path / "out")
    assert done.returncode == 1
    assert "no DICOM files found (4 other file(s) ignored" in done.stderr
    assert "3 .nii.gz image file(s) among them: convert them with -s .nii.gz" in done.stderr


# ---------------------------------------------------------------- the reason in the result
@pytest.mark.parametrize("failure", ["output is a file", "every file corrupt"])
def test_a_run_that_fails_every_case_says_why_in_its_result(tmp_path, failure):
    """`{converted 0, failed 24}` and the cause only in the log: the first failure's words are the result's
    first_error (the termination message) and the last `error:` line."""
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in" / "a", count=3)
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "in" / "b", count=3)
    out = tmp_path / "out"
    if failure == "output is a file":
        out.write_text("not a folder")
        target, cause = out / "images", "Not a directory"
    else:
        for path in (tmp_path / "in").rglob("*.dcm"):
            data = path.read_bytes()
            path.write_bytes(data[: data.index(b"\xe0\x7f\x10\x00") + 20])  # pixel data cut short
        target, cause = out, "truncated pixel data"
    log = tmp_path / "termination-log"
    done = cli("-q", "-d", tmp_path / "in", "-o", target,
               env={"MMAR_TERMINATION_LOG": str(log), "MMAR_STRICT_RESULTS": "1"})
    assert done.returncode == 1
    result = json.loads(log.read_text())
    assert result["converted"] == 0 and result["failed"] == 2, result
    assert result["first_error"].startswith("a series 7") and cause in result["first_error"], result
    assert done.stderr.strip().splitlines()[-1] == f"error: 2 failed, the first: {result['first_error']}"
    from mmar import results

    assert results.check(result).first_error == result["first_error"]


def test_first_error_is_cut_to_the_error_limit():
    from mmar import results

    long = "x" * 5000
    encoded = json.loads(results.encode(results.ConvertResult(command="convert", converted=0, skipped=0, failed=1,
                                                              first_error=long)))
    assert len(encoded["first_error"]) == results.ERROR_MAX and encoded["first_error"].endswith("...")
    assert encoded["failed"] == 1


def test_numpy_is_loaded_with_one_blas_thread_unless_the_user_says(tmp_path):
    """OpenBLAS's thread pool costs a small folder's run ~0.04 s of CPU at numpy's import; the converter's
    linear algebra is 3x3. A value the user set is kept."""
    code = ("import os, sys; from mmar.convert.cli import _one_blas_thread; _one_blas_thread(); import numpy; "
            "print(os.environ.get('OPENBLAS_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == "1", done.stderr
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**env, "OPENBLAS_NUM_THREADS": "3"})
    assert done.stdout.strip() == "3", done.stderr
