"""The header scan's fast path (`mmar.convert.header`) against pydicom: the same outcome for every file.

`discover.read_header` reads a plain file with its own element walker and decodes only what the converter
needs; every other file goes to pydicom (`read_header_pydicom`). Here both read every file of pydicom's own
test corpus (every transfer syntax, odd VRs, character sets, truncated and non-image files), generated series
and mosaics, and the real series of ../shared/data where it exists: the outcome (series UID, every SliceInfo
with its grid key and raw-pixel offset, the identity used for names and duplicates, the error of a bad file)
must be equal, and the fast path must take the plain files (else it would be a slow no-op).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from convert_fixtures.mosaic import make_mosaic_series
from convert_fixtures.series import make_series, pydicom_file
from mmar.convert import discover, header

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _plain(outcome: tuple):
    kind = outcome[0]
    if kind == "image":
        return (kind, outcome[1], [(info, info.grid_key) for info in outcome[2]], outcome[3])
    if kind == "skipped":
        return (kind, vars(outcome[1]), outcome[2], outcome[3])
    return outcome


def _compare(root: Path) -> tuple[int, int]:
    """Both readers on every file under root: (files, files the fast path took); asserts equal outcomes."""
    files = discover.list_files(root, ".dcm")
    taken = 0
    for path in files:
        fast = discover.read_header(root, path)
        reference = discover.read_header_pydicom(root, path)
        assert _plain(fast) == _plain(reference), path
        taken += header.read(path, path.stat().st_size) is not None
    return len(files), taken


@pytest.mark.filterwarnings("ignore")
def test_pydicom_test_corpus_reads_the_same():
    """Every file pydicom ships for its own tests: compressed, big endian, deflated, implicit VR, private
    tags, character sets, truncated, DICOMDIR, SR, RT... The plain image files among them go the fast way."""
    corpus = pydicom_file("MR_small.dcm").parent
    files, taken = _compare(corpus)
    assert files > 80 and taken >= 30, (files, taken)
    for name in ("MR_small.dcm", "CT_small.dcm", "JPEG2000.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"):
        assert header.read(corpus / name, (corpus / name).stat().st_size) is not None, name
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm"):  # big endian, deflate: pydicom's
        assert header.read(corpus / name, (corpus / name).stat().st_size) is None, name


def test_generated_series_and_mosaics_read_the_same(tmp_path):
    make_series(pydicom_file("MR_small.dcm"), tmp_path / "mr", count=4)
    make_series(pydicom_file("CT_small.dcm"), tmp_path / "ct", count=3)
    make_mosaic_series(tmp_path / "mosaic", slices=35, plane="sagittal")
    make_mosaic_series(tmp_path / "dwi", slices=36, plane="coronal", diffusion=[(0, (0, 0, 0)), (1000, (0.6, 0.8, 0))])
    files, taken = _compare(tmp_path)
    assert files == taken == 4 + 3 + 2 + 2


def test_files_the_fast_path_leaves_to_pydicom(tmp_path):
    """Cut short anywhere, a sequence of functional groups, a non-ASCII description, a value where pydicom's
    own rules apply (empty number): None, and read_header still gives pydicom's outcome."""
    (source,) = make_series(pydicom_file("MR_small.dcm"), tmp_path / "src", count=1)
    data = source.read_bytes()
    pixel = data.index(b"\xe0\x7f\x10\x00")
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "cut_in_header.dcm").write_bytes(data[:pixel - 20])
    (cases / "cut_at_pixels.dcm").write_bytes(data[:pixel + 4])
    ds = pydicom.dcmread(source)
    ds.SeriesDescription = "Kopf \u00fcber alles"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(cases / "latin1.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(source)
    ds.SliceThickness = ""
    ds.save_as(cases / "empty_number.dcm", enforce_file_format=True)
    for path in sorted(cases.iterdir()):
        assert header.read(path, path.stat().st_size) is None, path.name
    _compare(cases)


@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
@pytest.mark.parametrize("length", ["defined", "undefined"])
def test_a_sequence_just_before_the_pixel_data(tmp_path, syntax, length):
    """Where the pixels start is known after a sequence of defined length, not after one of undefined length
    (pydicom's raw element has no end): the raw-pixel offset must be the same as pydicom's either way."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ImplicitVRLittleEndian

    (source,) = make_series(pydicom_file("MR_small.dcm"), tmp_path / "src", count=1)
    ds = pydicom.dcmread(source)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "123", "DCM"
    ds.add_new(0x00880200, "SQ", Sequence([item]))  # Icon Image Sequence: the last element before the pixels
    if syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "in" / "icon.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == "implicit")
    data = bytearray(path.read_bytes())
    at = data.index(b"\x88\x00\x00\x02")
    head = 12 if syntax == "explicit" else 8
    declared = int.from_bytes(data[at + head - 4:at + head], "little")
    if length == "undefined" and declared != 0xFFFFFFFF:  # rewrite: undefined length + item + delimiter
        data[at + head - 4:at + head] = b"\xff\xff\xff\xff"
        end = at + head + declared
        data[end:end] = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    elif length == "defined" and declared == 0xFFFFFFFF:
        pytest.skip("pydicom wrote an undefined length")
    path.write_bytes(bytes(data))
    assert header.read(path, path.stat().st_size) is not None
    fast, reference = discover.read_header(path.parent, path), discover.read_header_pydicom(path.parent, path)
    assert _plain(fast) == _plain(reference)
    assert bool(fast[2][0].raw) == (length == "defined")


def test_files_plainly_not_dicom_are_ignored_as_pydicom_would(tmp_path):
    """Without a DICM prefix or a DICOM name, pydicom (force=False) refuses the file and it is ignored: said
    without importing pydicom; a .dcm name or a DICM prefix still goes to pydicom, which words the problem."""
    (source,) = make_series(pydicom_file("MR_small.dcm"), tmp_path / "src", count=1)
    folder = tmp_path / "in"
    folder.mkdir()
    files = {"truth.nii.gz": b"\x1f\x8b" + bytes(400), "notes.json": b"{}", "empty": b"", "short": b"DICM",
             "no_preamble": source.read_bytes()[128:], "bad.dcm": bytes(50), "cut_dicm": source.read_bytes()[:140],
             "README": b"x" * 200}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    for name in files:
        path = folder / name
        fast, reference = discover.read_header(folder, path), discover.read_header_pydicom(folder, path)
        assert _plain(fast) == _plain(reference), name
    assert discover._plainly_not_dicom(folder / "truth.nii.gz") and not discover._plainly_not_dicom(folder / "bad.dcm")


def test_values_have_pydicoms_types(tmp_path):
    (path,) = make_series(pydicom_file("MR_small.dcm"), tmp_path / "s", count=1, series_number=5)
    fast, offset = header.read(path, path.stat().st_size)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in ("Rows", "Columns", "BitsAllocated", "SeriesInstanceUID", "Modality"):
        assert fast.get(keyword) == ds.get(keyword) and type(fast.get(keyword)) in (int, str), keyword
    assert list(fast.ImagePositionPatient) == [float(v) for v in ds.ImagePositionPatient]
    assert str(fast.SeriesNumber) == str(ds.SeriesNumber) == "5" and fast.SeriesNumber == 5
    # the offset is where the Pixel Data element starts
    with open(path, "rb") as handle:
        handle.seek(offset)
        assert struct.unpack("<HH", handle.read(4)) == (0x7FE0, 0x0010)


@pytest.mark.skipif(not (SHARED / "dicom").is_dir(), reason="../shared/data not here")
def test_real_series_read_the_same_and_fast():
    for folder in (SHARED / "dicom", SHARED / "dicom-qa" / "In"):
        if folder.is_dir():
            files, taken = _compare(folder)
            dicom = sum(1 for path in discover.list_files(folder, ".dcm") if _is_dicom(path))
            assert taken == dicom, (folder, files, taken, dicom)


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"
