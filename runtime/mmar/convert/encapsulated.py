"""Compressed (encapsulated) pixel data decoded without pydicom: the codec's own module, nothing else.

pydicom decodes JPEG, JPEG-LS, JPEG 2000 and RLE through its pixel plugins; importing pydicom and
`pydicom.pixels` alone takes ~0.15-0.3 s, as long as dcm2niix's whole run on a small folder. The codecs
themselves load in a few ms once numpy is there: `_libjpeg` (pylibjpeg-libjpeg: JPEG lossless, JPEG-LS),
`_openjpeg` (pylibjpeg-openjpeg: JPEG 2000 lossless) and `rle.rle` (pylibjpeg-rle), the very
functions pydicom's `pylibjpeg` plugin calls. Here the Pixel Data element is read from the offset the
header scan noted, split into frames as pydicom splits it, each frame given to the one codec its transfer
syntax needs, and the result processed as pydicom's `Decoder.as_array` processes it:

- the frame's bytes are read with the item size the plugin reports (JPEG 2000 / JPEG-LS: from the
  codestream's precision) and the sign of Pixel Representation, into an array of Bits Allocated;
- JPEG 2000, monochrome: a codestream whose signedness is not Pixel Representation's is sign-corrected;
  JPEG-LS, signed: sign-extended from the codestream's precision; JPEG and RLE: the bits above Bits Stored
  are masked (or sign-extended);
- RLE gives colour by plane (reshaped to colour by pixel); JPEG 2000's YBR_ICT/YBR_RCT come out as RGB.

Only what is known to give pydicom's `pixel_array` exactly is taken (`plan` returns () for anything else):
the lossless syntaxes (JPEG lossless, JPEG-LS lossless and near-lossless, JPEG 2000 lossless, RLE; lossy
JPEG and JPEG 2000 (1.2.840.10008.1.2.4.50/51/91) decode through GDCM in pydicom, whose rounding differs),
MONOCHROME1/2, RGB (and JPEG 2000's YBR_ICT/RCT) of JPEG 2000 and RLE, 8 or 16 bits (RLE also 32), one
frame (all fragments) or one fragment a frame. Colour JPEG / JPEG-LS (pydicom may change the colour space
from the codestream's APP markers), YBR_FULL*, PALETTE COLOR, JP2 headers, frames spread over several
fragments, and any codec error or size that is not the expected one return None from `decode`, and the
caller decodes the file with pydicom as before, so the output never changes. `tests/convert/test_convert_encapsulated.py` checks equality with pydicom's `pixel_array` on pydicom's test
corpus and the shared real series.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

JPEG_BASELINE, JPEG_EXTENDED = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS, JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS, JPEG_LS_NEAR = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS, J2K = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
# Taken: the syntaxes whose decoding is exact integer arithmetic, so every decoder gives the same pixels.
# Not taken: the lossy DCT and wavelet ones (JPEG baseline/extended, JPEG 2000 that may be irreversible):
# pydicom's first plugin for them is GDCM, whose JPEG decoder rounds differently from libjpeg (off by one
# on a baseline test image), so they stay with pydicom.
JPEG = {JPEG_LOSSLESS, JPEG_LOSSLESS_SV1}
JPEG_LS = {JPEG_LS_LOSSLESS, JPEG_LS_NEAR}  # near-lossless JPEG-LS is lossy but decodes exactly (integers)
JPEG_2000 = {J2K_LOSSLESS}
# transfer syntax -> codec: the only module a series of that syntax imports
CODEC = {**{uid: "libjpeg" for uid in JPEG | JPEG_LS}, **{uid: "openjpeg" for uid in JPEG_2000},
         RLE_LOSSLESS: "rle"}
MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}
ITEM, SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"
PIXEL_DATA = b"\xe0\x7f\x10\x00"
UNDEFINED = 0xFFFFFFFF
# JPEG start-of-frame markers (pydicom's _SOF): SOF0-SOF15 but DHT, JPG, DAC; SOF55 (JPEG-LS)
_SOF = {bytes((0xFF, code)) for code in range(0xC0, 0xD0) if code not in (0xC4, 0xC8, 0xCC)} | {b"\xff\xf7"}
_UINT32 = struct.Struct("<L")


def plan(ds, syntax: str, pixel_offset: int | None) -> tuple:
    """("encapsulated", offset of the Pixel Data element, syntax, rows, columns, samples, frames, bits allocated, bits stored, pixel representation,
    photometric) of encapsulated pixels this module decodes exactly as pydicom does; () for anything else."""
    if pixel_offset is None or syntax not in CODEC:
        return ()
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.SamplesPerPixel)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation)
        photometric = str(ds.PhotometricInterpretation).strip()
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        planar = int(ds.PlanarConfiguration) if samples > 1 else 0  # pydicom requires it for colour
    except (AttributeError, KeyError, TypeError, ValueError):
        return ()
    if not (0 < rows < 65536 and 0 < cols < 65536 and frames >= 1 and signed in (0, 1) and planar in (0, 1)):
        return ()
    if allocated not in ((8, 16, 32) if syntax == RLE_LOSSLESS else (8, 16)) or not 1 <= stored <= allocated:
        return ()
    if samples == 1:
        if photometric not in MONOCHROME:
            return ()
    elif samples == 3:
        colour = {"RGB", "YBR_ICT", "YBR_RCT"} if syntax in JPEG_2000 else {"RGB"} if syntax == RLE_LOSSLESS else set()
        if photometric not in colour:
            return ()
    else:
        return ()
    return ("encapsulated", pixel_offset, syntax, rows, cols, samples, frames, allocated, stored, signed, photometric)


def decode(path: Path, planned: tuple) -> np.ndarray | None:
    """All frames of the file as (frames, rows, cols[, samples]), equal to pydicom's pixel_array; None where
    pydicom must decode it (anything unexpected: the caller falls back, so nothing changes)."""
    try:
        return _decode(path, planned)
    except Exception:
        return None


def _decode(path: Path, planned: tuple) -> np.ndarray | None:
    _, offset, syntax, rows, cols, samples, frames, allocated, stored, signed, photometric = planned
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    encoded = split_frames(data, frames)
    if encoded is None:
        return None
    pixels = rows * cols * samples
    kind = "ui"[signed]
    out = np.empty((frames, pixels), dtype=f"<{kind}{allocated // 8}")
    for index, src in enumerate(encoded):
        if syntax in JPEG_2000:
            frame, itemsize, precision, j2k_signed = _openjpeg_frame(src)
        elif syntax == RLE_LOSSLESS:
            frame, itemsize = _rle_frame(src, rows * cols, allocated), allocated // 8
        else:
            frame = _libjpeg_frame(src)
            itemsize = allocated // 8
            if syntax in JPEG_LS:
                precision = _jpeg_precision(src)
                itemsize = 1 if 0 < precision <= 8 else 2 if 8 < precision <= 16 else 0
        if frame is None or itemsize == 0 or len(frame) != pixels * itemsize or itemsize > allocated // 8:
            return None
        values = np.frombuffer(frame, dtype=f"<{kind}{itemsize}")
        if syntax == RLE_LOSSLESS and samples > 1:  # RLE: one segment (plane) a sample
            values = values.reshape(samples, rows * cols).T.reshape(-1)
        out[index] = values
        if syntax in JPEG_2000 and photometric in MONOCHROME:  # pydicom's _apply_sign_correction
            shift = 8 * out.itemsize - precision
            if shift > 0 and j2k_signed != signed:
                np.left_shift(out[index], shift, out=out[index])
                np.right_shift(out[index], shift, out=out[index])
        elif syntax in JPEG_LS and signed:
            shift = 8 * out.itemsize - precision
            if shift > 0:
                np.left_shift(out[index], shift, out=out[index])
                np.right_shift(out[index], shift, out=out[index])
    if syntax not in JPEG_2000 and syntax not in JPEG_LS and allocated > stored:  # _correct_unused_bits
        shift = allocated - stored
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)
    return out.reshape((frames, rows, cols) + ((samples,) if samples > 1 else ()))


def split_frames(data: bytes, frames: int) -> list[bytes] | None:
    """The encoded frames of an encapsulated Pixel Data element at the start of `data` (pydicom's
    generate_frames for the cases taken: one frame = all fragments joined; several = one fragment each)."""
    if data[:4] != PIXEL_DATA:
        return None
    if data[4:6] == b"OB" or data[4:6] == b"OW":  # explicit VR: tag, VR, 2 reserved, 4-byte length
        length, pos = _UINT32.unpack_from(data, 8)[0], 12
    else:
        length, pos = _UINT32.unpack_from(data, 4)[0], 8
    if length != UNDEFINED or data[pos:pos + 4] != ITEM:
        return None
    table = _UINT32.unpack_from(data, pos + 4)[0]  # the Basic Offset Table: not needed for the cases taken
    pos += 8 + table
    fragments = []
    end = len(data)
    while True:
        if pos + 8 > end:
            return None
        tag = data[pos:pos + 4]
        length = _UINT32.unpack_from(data, pos + 4)[0]
        pos += 8
        if tag == SEQUENCE_END:
            break
        if tag != ITEM or length == UNDEFINED or pos + length > end:
            return None
        fragments.append(data[pos:pos + length])
        pos += length
    if not fragments:
        return None
    if frames == 1:
        return [fragments[0] if len(fragments) == 1 else b"".join(fragments)]
    return fragments if len(fragments) == frames else None


def _libjpeg_frame(src: bytes):
    import _libjpeg  # pylibjpeg-libjpeg's extension, as pydicom's plugin calls it (libjpeg.decode_pixel_data v2)

    status, out, _params = _libjpeg.decode(src, colourspace=0, as_array=False)
    return out if int(status.decode("utf-8").split("::::")[0]) == 0 else None


def _openjpeg_frame(src: bytes):
    """(bytes, item size, precision, signed) of a J2K codestream (pydicom's get_j2k_parameters + plugin)."""
    if src[:4] != b"\xff\x4f\xff\x51":  # a bare codestream (a JP2 header: pydicom)
        return None, 0, 0, 0
    ssiz = src[42]
    precision, j2k_signed = (ssiz & 0x7F) + 1, int(bool(ssiz & 0x80))
    itemsize = 1 if precision <= 8 else 2 if precision <= 16 else 4 if precision <= 32 else 0
    from io import BytesIO

    import _openjpeg  # pylibjpeg-openjpeg's extension (openjpeg.decode_pixel_data v2)

    code, out = _openjpeg.decode(BytesIO(src), 0, as_array=False)
    return (out if code == 0 else None), itemsize, precision, j2k_signed


def _rle_frame(src: bytes, pixels: int, allocated: int):
    from rle.rle import decode_frame  # pylibjpeg-rle (rle.decode_pixel_data v2)

    return decode_frame(src, pixels, allocated, "<")


def _jpeg_precision(src: bytes) -> int:
    """The sample precision of a JPEG-LS codestream's SOF, as pydicom's _get_jpg_parameters finds it; 0
    where the walk does not reach one (pydicom would then assume Bits Stored: left to pydicom)."""
    if src[0:2] != b"\xff\xd8":
        return 0
    offset = 2
    while src[offset:offset + 2] not in _SOF:
        if offset + 4 > len(src):
            return 0
        offset += int.from_bytes(src[offset + 2:offset + 4], "big") + 2
    return src[offset + 4] if offset + 4 < len(src) else 0
