"""The geometry a compressed frame declares in its own header, read without decoding it.

A decoder sizes its output from the codestream's header, not from the data set's Rows and
Columns, so a 600-byte frame that claims 65535 × 65535 makes it allocate gigabytes. Each
function here reads the first bytes of one encapsulated frame (pure Python, no allocation
beyond the header) and returns what it declares, or ``None`` when the header is not where the
standard puts it (the decoder then gets to try, as before).
"""

import struct
from dataclasses import dataclass

from pydicom.uid import UID

# ISO/IEC 10918-1 B.1.1.3 table B.1: the start-of-frame markers (SOF0..SOF15 less DHT C4,
# JPG C8 and DAC CC).
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                      0xCF})
JPEG_LS_SOF = 0xF7  # ISO/IEC 14495-1 C.2.2: SOF55
JPEG_LS_LSE = 0xF8  # ISO/IEC 14495-1 C.2.4.1: LSE, ID 4 carries dimensions over 65535
# Markers without a length field (ISO/IEC 10918-1 B.1.1.3): TEM, RST0..7, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8, 0xD9})

# DICOM PS3.6 Annex A: JPEG (ISO/IEC 10918, retired processes included), JPEG-LS, JPEG 2000
# (and High-Throughput JPEG 2000), RLE.
JPEG_SYNTAXES = frozenset({f"1.2.840.10008.1.2.4.{n}" for n in (*range(50, 67), 70)})
JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
J2K_SYNTAXES = frozenset({f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 92, 93, 201, 202, 203)})
RLE_SYNTAX = "1.2.840.10008.1.2.5"
SYNTAXES = JPEG_SYNTAXES | JPEG_LS_SYNTAXES | J2K_SYNTAXES | {RLE_SYNTAX}  # what we can read


@dataclass(frozen=True)
class Geometry:
    """What a frame's header declares: ``rows`` 0 means "defined later" (JPEG DNL)."""

    kind: str  # "JPEG", "JPEG-LS", "JPEG 2000", "RLE"
    rows: int
    columns: int
    components: int
    precision: int = 0
    segments: tuple[int, ...] = ()  # RLE: the segment offsets


def _jpeg_marker_segments(frame: bytes):
    """(marker, offset of its parameters, length) for each marker segment before the scan
    data, ISO/IEC 10918-1 B.1.1.2–B.1.1.4 (JPEG-LS uses the same syntax, 14495-1 C.1)."""
    if frame[:2] != b"\xff\xd8":  # SOI
        return
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return
        while pos < len(frame) and frame[pos] == 0xFF:  # fill bytes (B.1.1.2)
            pos += 1
        if pos + 3 > len(frame):
            return
        marker = frame[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        (length,) = struct.unpack_from(">H", frame, pos)
        if length < 2:
            return
        yield marker, pos + 2, length - 2
        if marker == 0xDA:  # SOS: entropy-coded data follows
            return
        pos += length


def jpeg_geometry(frame: bytes) -> Geometry | None:
    """ISO/IEC 10918-1 B.2.2 frame header: SOFn, Lf, P, Y, X, Nf (lossless SOF3 included)."""
    for marker, pos, length in _jpeg_marker_segments(frame):
        if marker in JPEG_SOF:
            if length < 6 or pos + 6 > len(frame):
                return None
            precision, rows, columns, components = struct.unpack_from(">BHHB", frame, pos)
            return Geometry("JPEG", rows, columns, components, precision)
        if marker == 0xDA:
            return None
    return None


def jpeg_ls_geometry(frame: bytes) -> Geometry | None:
    """ISO/IEC 14495-1 C.2.2 frame header (SOF55: P, Y, X, Nf); a zero X or Y is given by an
    LSE segment of ID 4 (C.2.4.1.4: Wxy, then Y and X on Wxy bytes each)."""
    geometry, oversize = None, None
    for marker, pos, length in _jpeg_marker_segments(frame):
        if marker == JPEG_LS_SOF:
            if length < 6 or pos + 6 > len(frame):
                return None
            precision, rows, columns, components = struct.unpack_from(">BHHB", frame, pos)
            geometry = Geometry("JPEG-LS", rows, columns, components, precision)
        elif marker == JPEG_LS_LSE and length >= 2 and pos + 2 <= len(frame) and frame[pos] == 4:
            wxy = frame[pos + 1]
            if 1 <= wxy <= 4 and length >= 2 + 2 * wxy and pos + 2 + 2 * wxy <= len(frame):
                oversize = (int.from_bytes(frame[pos + 2:pos + 2 + wxy], "big"),
                            int.from_bytes(frame[pos + 2 + wxy:pos + 2 + 2 * wxy], "big"))
        elif marker == 0xDA:
            break
    if geometry is not None and oversize is not None:
        rows = geometry.rows or oversize[0]
        columns = geometry.columns or oversize[1]
        geometry = Geometry("JPEG-LS", rows, columns, geometry.components, geometry.precision)
    return geometry


def _jp2_codestream(frame: bytes) -> int | None:
    """Offset of the contiguous codestream box ('jp2c') of a JP2 file, ISO/IEC 15444-1 I.4
    (box: LBox, TBox, XLBox when LBox is 1; LBox 0: to the end)."""
    pos = 0
    while pos + 8 <= len(frame):
        size, kind = struct.unpack_from(">I4s", frame, pos)
        header = 8
        if size == 1:
            if pos + 16 > len(frame):
                return None
            (size,) = struct.unpack_from(">Q", frame, pos + 8)
            header = 16
        if kind == b"jp2c":
            return pos + header
        if size == 0 or size < header:
            return None
        pos += size
    return None


def j2k_geometry(frame: bytes) -> Geometry | None:
    """ISO/IEC 15444-1 A.5.1 SIZ: SOC (FF4F) then SIZ (FF51): Lsiz, Rsiz, Xsiz, Ysiz, XOsiz,
    YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz, then Ssiz/XRsiz/YRsiz per component. The image
    is (Xsiz − XOsiz) × (Ysiz − YOsiz). A JP2 wrapper (signature box 'jP  ') is skipped."""
    pos = 0
    if frame[4:8] == b"jP  ":
        pos = _jp2_codestream(frame)
        if pos is None:
            return None
    if frame[pos:pos + 4] != b"\xff\x4f\xff\x51" or pos + 4 + 38 > len(frame):
        return None
    (_, _, xsiz, ysiz, xosiz, yosiz, _, _, _, _, components) = struct.unpack_from(
        ">HHIIIIIIIIH", frame, pos + 4)
    if xosiz > xsiz or yosiz > ysiz:
        return None
    precision = (frame[pos + 42] & 0x7F) + 1 if pos + 42 < len(frame) else 0
    return Geometry("JPEG 2000", ysiz - yosiz, xsiz - xosiz, components, precision)


def rle_geometry(frame: bytes) -> Geometry | None:
    """DICOM PS3.5 G.5 RLE header: 16 little-endian uint32, the number of segments (1–15)
    then the offset of each (the first is 64), within the frame. Rows and Columns are not
    in it (``0``); ``components`` is the number of segments."""
    if len(frame) < 64:
        return None
    values = struct.unpack_from("<16I", frame, 0)
    count = values[0]
    if not 1 <= count <= 15:
        return Geometry("RLE", 0, 0, count)
    return Geometry("RLE", 0, 0, count, segments=values[1:1 + count])


def geometry(syntax: UID | str, frame: bytes) -> Geometry | None:
    """The geometry the header of ``frame`` declares, for a compressed transfer syntax."""
    try:
        if syntax in JPEG_SYNTAXES:
            return jpeg_geometry(frame)
        if syntax in JPEG_LS_SYNTAXES:
            return jpeg_ls_geometry(frame)
        if syntax in J2K_SYNTAXES:
            return j2k_geometry(frame)
        if syntax == RLE_SYNTAX:
            return rle_geometry(frame)
    except (struct.error, IndexError, ValueError):
        return None
    return None


def problem(found: Geometry, rows: int, columns: int, samples: int, bits_allocated: int,
            frame_length: int, budget: int) -> str | None:
    """Why a frame that declares ``found`` must not be decoded for a data set of ``rows`` ×
    ``columns`` × ``samples``, or ``None``."""
    said = f"dataset says {rows}x{columns}"
    if found.kind == "RLE":
        expected = samples * -(-bits_allocated // 8)
        if found.components != expected:
            return (f"RLE header declares {found.components} segments (dataset's "
                    f"SamplesPerPixel × bytes per sample: {expected})")
        offsets = found.segments
        if offsets[0] != 64 or any(b <= a for a, b in zip(offsets, offsets[1:])) \
                or offsets[-1] >= frame_length:
            return f"RLE segment offsets {list(offsets)} do not fit a frame of {frame_length} bytes"
        return None  # each segment decodes to rows × columns bytes: bounded by the data set
    claimed = f"{found.kind} codestream claims {found.rows}x{found.columns}"
    if found.rows * found.columns * max(found.components, 1) > budget:
        return (f"{claimed}x{found.components}, more than minipacs decodes ({budget} samples; "
                f"{said})")
    if (found.rows and found.rows != rows) or found.columns != columns:
        return f"{claimed} ({said})"
    if found.components != samples:
        return (f"{found.kind} codestream claims {found.components} components (dataset's "
                f"SamplesPerPixel is {samples})")
    return None
