"""Bounds on what a stored file can make minipacs allocate before rendering starts.

pydicom inflates a Deflated Explicit VR Little Endian data set (PS3.5 A.5) whole, in memory,
as it reads the file: a 1 MB file can inflate to gigabytes (a private element, or overlay
data, of zeros). :func:`check_deflated` inflates it first as a stream, keeping a few
megabytes at most, and refuses a data set larger than its pixel data justify.
"""

import struct
import zlib
from typing import Iterator

from .render import MAX_FRAME_SAMPLES, RenderError

DEFLATED = "1.2.840.10008.1.2.1.99"
#: Non-pixel elements a deflated data set may hold beside its pixel data (overlays, private
#: data, a thumbnail sequence): far more than real files carry.
MAX_OTHER_BYTES = 64 << 20
#: Inflated bytes at most, whatever the header says: a frame of MAX_FRAME_SAMPLES 32-bit
#: samples and the other elements. pydicom holds all of them, and copies the pixel data.
MAX_INFLATED_BYTES = MAX_FRAME_SAMPLES * 4 + MAX_OTHER_BYTES
PIECE = 1 << 20  # inflated per step
# VRs whose length has 4 bytes after 2 reserved ones in explicit VR (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
            b"UT", b"UV"}
ROWS, COLUMNS, SAMPLES, FRAMES, BITS = 0x00280010, 0x00280011, 0x00280002, 0x00280008, 0x00280100
TRANSFER_SYNTAX = 0x00020010


class _Stream:
    """Bytes read from an iterator of pieces, keeping only what has not been read yet."""

    def __init__(self, pieces: Iterator[bytes]):
        self.pieces, self.buffer, self.position = pieces, bytearray(), 0

    def _fill(self) -> bool:
        piece = next(self.pieces, None)
        if piece is None:
            return False
        self.buffer += piece
        return True

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n and self._fill():
            pass
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.position += len(out)
        return out

    def unread(self, data: bytes) -> None:
        """Put back what was just read."""
        self.buffer[:0] = data
        self.position -= len(data)

    def skip(self, n: int) -> None:
        while n > 0 and (self.buffer or self._fill()):
            step = min(n, len(self.buffer))
            del self.buffer[:step]
            self.position, n = self.position + step, n - step


def top_level(stream: _Stream, wanted: set[int], group: int | None = None) -> dict[int, bytes]:
    """The values of the ``wanted`` top-level elements of an explicit VR little endian data set
    (PS3.5 7.1.2, 7.5), skipping every other value, nested ones included; stops at the end, or
    before the first element outside ``group`` when one is given (``stream.position`` then
    says where it starts).

    An undefined length opens a sequence (its items end with a Sequence Delimitation Item) or an
    item (ended by an Item Delimitation Item): only elements outside them are top level."""
    values: dict[int, bytes] = {}
    depth = 0
    while True:
        head = stream.read(8)
        if len(head) < 8:
            return values
        tag_group, element = struct.unpack("<HH", head[:4])
        if tag_group == 0xFFFE:  # Item, Item / Sequence Delimitation Item: no VR
            length = struct.unpack("<I", head[4:])[0]
            if element == 0xE000 and length != 0xFFFFFFFF:
                stream.skip(length)
            else:
                depth += 1 if element == 0xE000 else -1
            continue
        if group is not None and depth == 0 and tag_group != group:
            stream.unread(head)
            return values
        vr = head[4:6]
        length = struct.unpack("<I", stream.read(4))[0] if vr in LONG_VRS else \
            struct.unpack("<H", head[6:])[0]
        tag = tag_group << 16 | element
        if length == 0xFFFFFFFF:
            if vr != b"SQ":  # UN of undefined length holds implicit VR items: not walked
                return values
            depth += 1
        elif depth == 0 and tag in wanted and length <= 64:
            values[tag] = stream.read(length)
        else:
            stream.skip(length)


def inflated_pieces(data: bytes | memoryview, limit: int) -> Iterator[bytes]:
    """Raw deflate ``data`` (RFC 1951) inflated a PIECE at a time; RenderError past ``limit``."""
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    for at in range(0, len(data), 1 << 16):
        pending = data[at:at + (1 << 16)]
        while pending:
            try:
                piece = inflater.decompress(pending, PIECE)
            except zlib.error as exc:
                raise RenderError(f"deflated data set is corrupt: {exc}") from exc
            pending, total = inflater.unconsumed_tail, total + len(piece)
            if total > limit:
                raise RenderError(f"deflated data set inflates to more than {limit} bytes, "
                                  "more than minipacs reads")
            yield piece
            if inflater.eof:
                return


def _number(value: bytes | None, unsigned: bool = True) -> int:
    """A US (2 bytes, little endian) or IS (text) value; 1 where absent or unreadable."""
    if not value:
        return 1
    try:
        return struct.unpack("<H", value[:2])[0] if unsigned else int(value.strip(b" \0"))
    except (struct.error, ValueError):
        return 1


def justified_bytes(values: dict[int, bytes]) -> int:
    """Pixel bytes that Rows × Columns × Samples per Pixel × Number of Frames × Bits Allocated
    call for (C.7.6.3), plus the non-pixel elements' allowance."""
    samples = 1
    for tag in (ROWS, COLUMNS, SAMPLES, BITS):
        samples *= _number(values.get(tag))
    return samples * _number(values.get(FRAMES), unsigned=False) // 8 + MAX_OTHER_BYTES


def check_deflated(data: bytes) -> None:
    """For a Part 10 file in the Deflated transfer syntax: inflate it as a stream (a few MB at
    a time, nothing kept) and raise :class:`RenderError` when it inflates to more than its pixel
    data justify, or than MAX_INFLATED_BYTES. Call before ``pydicom.dcmread``; any other file
    passes untouched, and one whose header cannot be read is left to pydicom."""
    start = 132 if data[128:132] == b"DICM" else 0
    meta = _Stream(iter([memoryview(data)[start:]]))
    syntax = top_level(meta, {TRANSFER_SYNTAX}, group=0x0002).get(TRANSFER_SYNTAX, b"")
    if syntax.rstrip(b"\0 ") != DEFLATED.encode():
        return
    stream = _Stream(inflated_pieces(memoryview(data)[start + meta.position:], MAX_INFLATED_BYTES))
    values = top_level(stream, {ROWS, COLUMNS, SAMPLES, FRAMES, BITS})
    stream.skip(MAX_INFLATED_BYTES)  # the rest, if the walk stopped early
    justified = justified_bytes(values)
    if stream.position > justified:
        raise RenderError(f"deflated data set inflates to {stream.position} bytes, more than its "
                          f"pixel data justify ({justified - MAX_OTHER_BYTES} bytes, and "
                          f"{MAX_OTHER_BYTES} for other elements)")
