"""The header scan's fast path: the few DICOM elements the converter needs, read without pydicom.

A folder of real scanner data is hundreds to tens of thousands of small files (EPI, fMRI, DWI: one 2D slice a
file, ~300 data elements each, most of them private). pydicom builds a Dataset of every element and converts
each value through its hooks; the converter reads ~35 of them. `read` walks the elements of a file with
`struct` (the value of an element it does not need is never decoded: sequences of undefined length are
walked item by item, everything else is stepped over by its length), decodes only the elements of `WANTED`,
and stops where the pixel data starts, so the pixels can later be read straight from that offset.

It takes only the plain case: a DICM preamble, implicit or explicit VR little endian data set (every
uncompressed and encapsulated transfer syntax but big endian and deflate), values as the converter expects
them (ASCII text, the VR the standard gives, one value where one is expected), and a Pixel Data element inside
the file. Anything else (big endian, deflate, enhanced multi-frame functional groups, a file cut short,
an unexpected VR, non-ASCII text, no image header) returns None and the caller reads the file with pydicom,
which also words the errors. The values have the types pydicom gives (`slices_from_header` reads both
alike; `tests/convert/test_convert_header.py` checks every outcome against pydicom's on real and generated files).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

# tag -> (keyword, VR, several values allowed). The elements the header scan reads (discover, dicom, mosaic).
WANTED: dict[int, tuple[str, str, bool]] = {
    0x00080008: ("ImageType", "CS", True),
    0x00080016: ("SOPClassUID", "UI", False),
    0x00080018: ("SOPInstanceUID", "UI", False),
    0x00080032: ("AcquisitionTime", "TM", False),
    0x00080060: ("Modality", "CS", False),
    0x0008103E: ("SeriesDescription", "LO", False),
    0x00180023: ("MRAcquisitionType", "CS", False),
    0x00180050: ("SliceThickness", "DS", False),
    0x00180080: ("RepetitionTime", "DS", False),
    0x00180086: ("EchoNumbers", "IS", False),
    0x00180088: ("SpacingBetweenSlices", "DS", False),
    0x00181164: ("ImagerPixelSpacing", "DS", True),
    0x0020000E: ("SeriesInstanceUID", "UI", False),
    0x00200011: ("SeriesNumber", "IS", False),
    0x00200012: ("AcquisitionNumber", "IS", False),
    0x00200013: ("InstanceNumber", "IS", False),
    0x00200032: ("ImagePositionPatient", "DS", True),
    0x00200037: ("ImageOrientationPatient", "DS", True),
    0x00200100: ("TemporalPositionIdentifier", "IS", False),
    0x00280002: ("SamplesPerPixel", "US", False),
    0x00280004: ("PhotometricInterpretation", "CS", False),
    0x00280006: ("PlanarConfiguration", "US", False),
    0x00280008: ("NumberOfFrames", "IS", False),
    0x00280010: ("Rows", "US", False),
    0x00280011: ("Columns", "US", False),
    0x00280030: ("PixelSpacing", "DS", True),
    0x00280100: ("BitsAllocated", "US", False),
    0x00280101: ("BitsStored", "US", False),
    0x00280103: ("PixelRepresentation", "US", False),
    0x00281052: ("RescaleIntercept", "DS", False),
    0x00281053: ("RescaleSlope", "DS", False),
    0x3004000C: ("GridFrameOffsetVector", "DS", True),
    0x3004000E: ("DoseGridScaling", "DS", False),
}
CSA_IMAGE_HEADER = 0x00291010  # Siemens CSA image header (mosaics): kept as bytes, under its tag
# elements that send the file to pydicom: the enhanced multi-frame functional groups (nested sequences)
TO_PYDICOM = {0x52009229, 0x52009230}
META_WANTED = {0x00020002: "MediaStorageSOPClassUID", 0x00020010: "TransferSyntaxUID"}
# transfer syntaxes whose data set is little endian: implicit VR (False) or explicit VR (True)
IMPLICIT_LE = "1.2.840.10008.1.2"
NOT_HERE = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflate: pydicom
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
PIXEL_DATA = 0x7FE00010
FIRST_PIXEL_TAG = 0x7FE00008  # float pixel data; pydicom's stop_before_pixels stops at 7FE0,0008/0009/0010
# one look-up per element: the wanted ones, the CSA header (kept as bytes), the ones that go to pydicom
SPECIAL: dict[int, tuple] = {**WANTED, CSA_IMAGE_HEADER: (CSA_IMAGE_HEADER, "OB", False),
                             **{tag: (None, "SQ", False) for tag in TO_PYDICOM}}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
WHOLE_FILE = 1 << 20  # files up to this size are read in one call; larger ones in two

_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_UINT32 = struct.Struct("<L")
_UINT16 = struct.Struct("<H")


def import_pydicom():
    """pydicom, for the files the fast path leaves to it, compressed pixels and sidecars; imported without
    `requests` (0.1 s of start-up: pydicom only wants it to download its own test files, which the converter
    never does). A process that already has requests, or pydicom, keeps them."""
    module = sys.modules.get("pydicom")
    if module is not None:
        return module
    blocked = "requests" not in sys.modules
    if blocked:
        sys.modules["requests"] = None  # `import requests` raises ImportError: pydicom goes on without it
    try:
        import pydicom
    finally:
        if blocked and sys.modules.get("requests", 0) is None:
            del sys.modules["requests"]
    return pydicom


class NotPlain(Exception):
    """This file is not the plain case: pydicom reads it."""


class IS(int):
    """An Integer String as pydicom gives it: an int whose str() is the stripped text (pydicom's IS)."""

    original_string: str

    def __str__(self) -> str:
        return self.original_string if len(self.original_string) <= 16 else int.__repr__(self)


class Element:
    """A value kept as bytes (the CSA header), as pydicom's element: `.value`."""

    __slots__ = ("value",)

    def __init__(self, value: bytes):
        self.value = value


class Header:
    """The wanted elements of one file, read like a pydicom Dataset: `h.get("Rows")`, `h.Rows`,
    `"Rows" in h`, `h.get((0x0029, 0x1010)).value`, `h.file_meta.get("TransferSyntaxUID")`."""

    __slots__ = ("values", "file_meta")

    def __init__(self, values: dict, file_meta: dict):
        self.values = values
        self.file_meta = file_meta

    def get(self, key, default=None):
        if isinstance(key, tuple):
            raw = self.values.get((key[0] << 16) | key[1])
            return Element(raw) if raw is not None else default
        return self.values.get(key, default)

    def __contains__(self, key) -> bool:
        if isinstance(key, tuple):
            return ((key[0] << 16) | key[1]) in self.values
        return key in self.values

    def __getattr__(self, name: str):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def read(path: Path, size: int) -> tuple[Header, int | None] | None:
    """(header, file offset of the Pixel Data element or None) of a plain file, None for anything else.

    The offset is None, as pydicom's stop_before_pixels leaves it unknown, when the element just before the
    pixel data is of undefined length (a sequence)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(size if size <= WHOLE_FILE else WHOLE_FILE)
            try:
                return _parse(data, size)
            except _Short:
                if len(data) >= size:
                    return None
                data += handle.read()
                return _parse(data, size)
    except Exception:  # NotPlain, cut short, unreadable, a value that does not parse: pydicom reads it and says why
        return None


class _Short(Exception):
    """The buffer ends before the element does."""


def _parse(data: bytes, size: int) -> tuple[Header, int | None]:
    if len(data) < 144 or data[128:132] != b"DICM":
        raise NotPlain
    end = len(data)
    # file meta: explicit VR little endian, group 0002
    meta = {}
    pos = 132
    while True:
        if pos + 8 > end:
            raise _Short
        group, element, vr, length = _EXPLICIT.unpack_from(data, pos)
        if group != 2:
            break
        if vr in LONG_VRS:
            length = _UINT32.unpack_from(data, pos + 8)[0]
            pos += 12
        else:
            pos += 8
        if length == UNDEFINED:
            raise NotPlain
        tag = (group << 16) | element
        if tag in META_WANTED:
            if pos + length > end:
                raise _Short
            meta[META_WANTED[tag]] = _text(data[pos:pos + length]).rstrip("\0 ")
        pos += length
    syntax = meta.get("TransferSyntaxUID")
    if not syntax or syntax in NOT_HERE:
        raise NotPlain
    explicit = syntax != IMPLICIT_LE
    values: dict = {}
    last = 0
    last_is_sequence = False  # the last element had undefined length: where it ends is not known
    special = SPECIAL
    while True:
        if pos + 8 > end:
            raise _Short if end < size else NotPlain  # the file ends before its pixel data: pydicom says why
        if explicit:
            group, element, vr, length = _EXPLICIT.unpack_from(data, pos)
            tag = (group << 16) | element
            if tag >= FIRST_PIXEL_TAG:
                break
            if vr in LONG_VRS:
                if pos + 12 > end:
                    raise _Short
                length = _UINT32.unpack_from(data, pos + 8)[0]
                pos += 12
            elif vr.isupper():
                pos += 8
            else:  # no VR there: implicit VR data under an explicit transfer syntax
                raise NotPlain
        else:
            group, element, length = _IMPLICIT.unpack_from(data, pos)
            tag = (group << 16) | element
            if tag >= FIRST_PIXEL_TAG:
                break
            vr = None
            pos += 8
        if tag <= last:  # out of order: pydicom's
            raise NotPlain
        last = tag
        if length == UNDEFINED:  # a sequence (or, implicit VR, an element pydicom reads as one)
            if explicit and vr not in (b"SQ", b"UN"):
                raise NotPlain
            if tag in TO_PYDICOM:
                raise NotPlain
            pos = _skip_items(data, pos, explicit and vr != b"UN")  # UN: the items are implicit VR
            last_is_sequence = True
            continue
        if pos + length > end:
            raise _Short
        wanted = special.get(tag)
        if wanted is not None:
            keyword, expected, several = wanted
            if keyword is None:  # the functional groups of an enhanced multi-frame file: pydicom's
                raise NotPlain
            if keyword == CSA_IMAGE_HEADER:
                if vr is not None and vr not in (b"OB", b"UN", b"OW"):
                    raise NotPlain
                values[keyword] = data[pos:pos + length]
            else:
                if vr is not None and vr.decode("latin-1") != expected:
                    raise NotPlain
                values[keyword] = _value(data[pos:pos + length], expected, several)
        last_is_sequence = False
        pos += length
    if tag != PIXEL_DATA or size - pos < 8:  # float pixel data, or none (pydicom stops only at these)
        raise NotPlain
    return Header(values, meta), (None if last_is_sequence else pos)


def _skip_items(data: bytes, pos: int, explicit: bool) -> int:
    """Past a sequence of undefined length starting at its first item: the offset after its delimiter."""
    end = len(data)
    while True:
        if pos + 8 > end:
            raise _Short
        group, element, length = _IMPLICIT.unpack_from(data, pos)
        tag = (group << 16) | element
        pos += 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise NotPlain
        if length != UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements up to the item delimiter
            if pos + 8 > end:
                raise _Short
            if explicit:
                group, element, vr, length = _EXPLICIT.unpack_from(data, pos)
                if ((group << 16) | element) in (ITEM_END, SEQUENCE_END):
                    length = _UINT32.unpack_from(data, pos + 4)[0]
                    vr = None
                    pos += 8
                elif vr in LONG_VRS:
                    if pos + 12 > end:
                        raise _Short
                    length = _UINT32.unpack_from(data, pos + 8)[0]
                    pos += 12
                else:
                    pos += 8
            else:
                group, element, length = _IMPLICIT.unpack_from(data, pos)
                vr = None
                pos += 8
            tag = (group << 16) | element
            if tag == ITEM_END:
                break
            if tag == SEQUENCE_END:
                raise NotPlain
            if length == UNDEFINED:
                if explicit and vr not in (b"SQ", b"UN"):
                    raise NotPlain
                pos = _skip_items(data, pos, explicit and vr != b"UN")
            else:
                pos += length
        if pos > end:
            raise _Short


def _text(raw: bytes) -> str:
    return raw.decode("ascii")  # non-ASCII (a character set to apply): UnicodeDecodeError -> pydicom


def _value(raw: bytes, vr: str, several: bool):
    """One element's value with the type pydicom gives it (str, float, IS, int; a list when several)."""
    if vr == "US":
        if len(raw) != 2:
            raise NotPlain
        return _UINT16.unpack(raw)[0]
    text = _text(raw)
    if vr in ("LO", "SH"):  # pydicom: split, then each value stripped on the right
        items = [item.rstrip("\0 ") for item in text.split("\\")]
    else:  # CS, UI, TM, DS, IS: stripped on the right, then split
        items = text.rstrip(" \0").split("\\")
    if len(items) > 1 and not several:
        raise NotPlain
    if vr == "DS":
        if not text.strip(" \0"):
            raise NotPlain  # an empty number: pydicom's own rules
        numbers = [float(item) for item in items]
        return numbers[0] if len(numbers) == 1 else numbers
    if vr == "IS":
        stripped = items[0].strip()
        if not stripped:
            raise NotPlain
        number = IS(int(stripped))
        number.original_string = stripped
        return number
    return items[0] if len(items) == 1 else items
