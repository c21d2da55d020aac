"""Compressed pixels decoded by the codec's own module (`mmar.convert.encapsulated`) equal pydicom's
`pixel_array` exactly: pydicom's test corpus, files generated here for every codec taken (signed and
unsigned, 12 and 16 bits stored, several frames, a frame in several fragments), and the shared real series
where ../shared/data exists; what the direct path declines (lossy JPEG, colour JPEG, JP2) goes to pydicom.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from convert_fixtures.series import pydicom_file
from mmar.convert import discover, encapsulated

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def pydicom_pixels(path: Path) -> np.ndarray:
    """pydicom's pixel_array as the converter holds it: (frames, rows, cols[, samples])."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        array = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    return array[None] if frames == 1 and array.ndim == (2 if samples == 1 else 3) else array


def planned(path: Path) -> tuple:
    """The pixel plan the converter's header scan gives the file (SliceInfo.raw)."""
    outcome = discover.read_header(path.parent, path)
    assert outcome[0] == "image", outcome
    return outcome[2][0].raw


def assert_direct_equals_pydicom(path: Path) -> None:
    plan = planned(path)
    assert plan and plan[0] == "encapsulated", (path.name, plan)
    logging.disable(logging.CRITICAL)  # pydicom's plugin log of a codec it could not use
    try:
        expected = pydicom_pixels(path)
    finally:
        logging.disable(logging.NOTSET)
    got = encapsulated.decode(path, plan)
    assert got is not None, path.name
    assert got.dtype == expected.dtype and got.shape == expected.shape, (path.name, got.dtype, expected.dtype)
    assert np.array_equal(got, expected), path.name


# pydicom's own test files of the syntaxes taken (those present: some are downloaded on demand)
CORPUS = ["MR_small_RLE.dcm", "rtdose_rle.dcm", "rtdose_rle_1frame.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm",
          "SC_rgb_rle_32bit.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_jpeg_ls_lossless.dcm",
          "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm", "MR_small_jp2klossless.dcm",
          "J2K_pixelrep_mismatch.dcm", "examples_jpeg2k.dcm", "emri_small_jpeg_2k_lossless.dcm",
          "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"]


@pytest.mark.parametrize("name", CORPUS)
def test_pydicom_corpus_decodes_as_pydicom_does(name):
    assert_direct_equals_pydicom(pydicom_file(name))


def _compressed(tmp_path: Path, uid, signed: int, stored: int, frames: int = 1) -> Path:
    import pydicom

    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    base = ds.pixel_array.astype(np.int32)
    planes = [(base - base.min()) if not signed else base - 1000 + 37 * k for k in range(frames)]
    limit = (1 << (stored - signed)) - 1
    array = np.stack(planes).clip(-limit - 1 if signed else 0, limit).astype(np.int16 if signed else np.uint16)
    array = array[0] if frames == 1 else array
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = signed, stored, stored - 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = array.tobytes()
    ds.compress(uid, arr=array)
    path = tmp_path / f"{uid}_{signed}_{stored}_{frames}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("stored", [12, 16])
@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless"])
def test_generated_files_decode_as_pydicom_does(tmp_path, syntax, signed, stored):
    import pydicom.uid

    uid = getattr(pydicom.uid, syntax)
    assert_direct_equals_pydicom(_compressed(tmp_path, uid, signed, stored))
    assert_direct_equals_pydicom(_compressed(tmp_path, uid, signed, stored, frames=3))  # a fragment a frame


def test_a_frame_in_several_fragments_and_j2k_sign_mismatch(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    path = _compressed(tmp_path, pydicom.uid.JPEG2000Lossless, 1, 12)
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame], fragments_per_frame=3, has_bot=True)
    ds.save_as(tmp_path / "fragments.dcm")
    assert_direct_equals_pydicom(tmp_path / "fragments.dcm")
    ds.PixelRepresentation = 0  # the codestream says signed, the header unsigned: pydicom's sign correction
    ds.save_as(tmp_path / "mismatch.dcm")
    assert_direct_equals_pydicom(tmp_path / "mismatch.dcm")


@pytest.mark.parametrize("process", ["JPEGLosslessProcess14", "JPEGLosslessProcess14_1"])
def test_jpeg_lossless_from_gdcm_decodes_as_pydicom_does(tmp_path, process):
    gdcm = pytest.importorskip("gdcm")
    for name in ("CT_small.dcm", "MR_small.dcm"):  # signed 16-bit
        reader = gdcm.ImageReader()
        reader.SetFileName(str(pydicom_file(name)))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, process)))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(tmp_path / name))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        assert_direct_equals_pydicom(tmp_path / name)


def test_what_the_direct_path_declines_goes_to_pydicom(tmp_path):
    """Lossy JPEG (pydicom decodes it with GDCM, which rounds differently from libjpeg), lossy JPEG 2000,
    colour JPEG / YBR: no plan, so pydicom decodes them as before."""
    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate

    for name in ("JPEG2000.dcm", "JPGExtended.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        try:
            path = pydicom_file(name)
        except pytest.skip.Exception:
            continue
        assert not planned(path), name
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    y, x = np.mgrid[0:64, 0:64]
    image = (np.sin(x / 5.0) * 100 + 128).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=70)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "baseline.dcm", enforce_file_format=True)
    assert not planned(tmp_path / "baseline.dcm")
    # a codec error: decode says None (the caller then asks pydicom), never a wrong array
    plan = planned(_compressed(tmp_path, pydicom.uid.RLELossless, 0, 16))
    broken = tmp_path / "broken.dcm"
    data = bytearray((tmp_path / f"{pydicom.uid.RLELossless}_0_16_1.dcm").read_bytes())
    data[plan[1] + 24:] = b"\x00" * (len(data) - plan[1] - 24)
    broken.write_bytes(bytes(data))
    assert encapsulated.decode(broken, plan) is None


@pytest.mark.skipif(not (SHARED / "dicom").is_dir(), reason="../shared/data not here")
def test_every_compressed_shared_file_decodes_as_pydicom_does():
    import pydicom

    taken = 0
    for path in sorted(p for p in (SHARED / "dicom").rglob("*") if p.is_file()):
        try:
            syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        except Exception:
            continue
        if syntax in encapsulated.CODEC:
            assert_direct_equals_pydicom(path)
            taken += 1
    assert taken >= 20  # JPEG lossless, JPEG-LS, JPEG 2000 (grey and RGB), RLE
