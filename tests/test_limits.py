"""Decompression bombs other than codestream headers (tests/test_codestream.py has those):
deflated data sets, segmented palette LUTs, overlays and float frames, each made here small on
disk, is refused with its reason or rendered within a memory bound; and the render sanitation of
absurd window and rescale values."""

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from corpus import find
from minipacs import limits
from minipacs.render import MAX_LUT_ENTRIES, RenderError, render, segmented_lut_entries


def ct() -> Dataset:
    ds = pydicom.dcmread(find("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    return ds


def _explicit(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _zeros_deflated(size: int) -> bytes:
    """``size`` zero bytes as raw deflate blocks with no final block: one fully flushed MiB,
    repeated, since a full flush makes its blocks independent (RFC 1951), then the rest."""
    def flushed(n: int) -> bytes:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return deflater.compress(bytes(n)) + deflater.flush(zlib.Z_FULL_FLUSH)
    return flushed(1 << 20) * (size >> 20) + flushed(size & ((1 << 20) - 1))


def deflated(ds: Dataset, tag: int | None = None, vr: bytes = b"OB", zeros: int = 0) -> bytes:
    """``ds`` as a Deflated Explicit VR Little Endian Part 10 file (PS3.5 A.5); with ``tag``,
    an element of ``zeros`` zero bytes put in its place among the others, without ever being
    held in memory."""
    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if tag is None or elem.tag < tag else after).add(elem)
    parts = [_explicit(before)]
    if tag is not None:
        parts.append(struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, zeros))
    head = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    tail = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = (head.compress(b"".join(parts)) + head.flush(zlib.Z_FULL_FLUSH) + _zeros_deflated(zeros)
            + tail.compress(_explicit(after)) + tail.flush())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)
    return bytes(128) + b"DICM" + meta.getvalue() + body


def float_frame(side: int) -> Dataset:
    """A CT turned into a ``side``² float32 frame of zeros (Float Pixel Data, C.7.6.24)."""
    ds = ct()
    del ds.PixelData, ds.RescaleSlope, ds.RescaleIntercept
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = bytes(side * side * 4)
    return ds


def add_overlay(ds: Dataset, rows: int, columns: int, data: bytes, frames: int = 1) -> Dataset:
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", columns)
    ds.add_new(0x60000015, "IS", frames)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", data)
    return ds


def private_bomb() -> tuple[Dataset, bytes]:
    """A 1 GiB private element of zeros in a ~1 MB deflated file."""
    ds = ct()
    ds.add_new(0x00090010, "LO", "MINIPACS HOSTILE")
    return ds, deflated(ds, 0x00091000, b"OB", 1 << 30)


def overlay_bomb() -> tuple[Dataset, bytes]:
    """An overlay of 46341² bits (268 MB of zeros) in a ~260 KB deflated file."""
    ds = ct()
    add_overlay(ds, 46341, 46341, b"")
    del ds[0x6000, 0x3000]
    return ds, deflated(ds, 0x60003000, b"OW", -(-46341 * 46341 // 16) * 2)  # bits, as words


def float_at_the_budget() -> tuple[Dataset, bytes]:
    """An 11585² float32 frame of zeros (512 MiB) in a ~520 KB deflated file."""
    ds = float_frame(1)
    ds.Rows = ds.Columns = 11585
    del ds.FloatPixelData
    return ds, deflated(ds, 0x7FE00008, b"OF", 11585 * 11585 * 4)


def deflated_cases() -> dict[str, tuple[Dataset, bytes, str]]:
    """name → (data set, its deflated file, regular expression of the reason it is refused)."""
    return {
        "deflated_private_element_1_gib": (*private_bomb(), r"deflated data set inflates to "
                                                            r"more than 603979776 bytes"),
        "deflated_overlay_46341": (*overlay_bomb(), r"inflates to 2684\d+ bytes, more than its "
                                                    r"pixel data justify \(32768 bytes"),
    }


def test_a_normal_deflated_file_passes_and_renders_as_its_twin():
    data = deflated(ct())
    limits.check_deflated(data)
    shown = render(pydicom.dcmread(io.BytesIO(data)))
    assert np.array_equal(shown.pixels, render(ct()).pixels)


def test_files_in_other_syntaxes_are_not_inflated():
    for ds in (ct(), pydicom.dcmread(find("JPEG2000.dcm"))):
        buffer = io.BytesIO()
        ds.save_as(buffer)
        limits.check_deflated(buffer.getvalue())
    limits.check_deflated(b"")
    limits.check_deflated(bytes(128) + b"DICM" + bytes(100))


def test_a_corrupt_deflate_stream_is_refused_with_its_reason():
    data = deflated(ct())
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]  # after (0002,0000) UL, its length
    limits.check_deflated(data[:meta_end] + zlib.compress(b"", 9)[2:-4])  # empty: passes
    with pytest.raises(RenderError, match="deflated data set is corrupt"):
        limits.check_deflated(data[:meta_end] + b"\xff" * 100)


@pytest.mark.parametrize("name", sorted(deflated_cases()))
def test_deflate_bombs_are_refused_before_pydicom_inflates_them(name):
    _, data, reason = deflated_cases()[name]
    assert len(data) < 1_200_000
    with pytest.raises(RenderError, match=reason):
        limits.check_deflated(data)


def test_float_frame_at_the_budget_passes_the_deflate_bound():
    """11585² float32 (512 MiB of pixels) is within the sample budget: not refused for size."""
    _, data = float_at_the_budget()
    assert len(data) < 600_000
    limits.check_deflated(data)


def test_the_top_level_walk_skips_nested_sequences():
    """Rows inside an undefined-length sequence item is not the image's Rows."""
    ds = ct()
    item = Dataset()
    item.Rows = 9999
    ds.ReferencedImageSequence = [item]
    body = _explicit(ds)
    sequence = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    assert sequence not in body  # pydicom writes defined lengths: make one undefined
    seq = ds["ReferencedImageSequence"]
    seq.is_undefined_length = True
    seq.value[0].is_undefined_length_sequence_item = True
    body = _explicit(ds)
    assert sequence in body
    found = limits.top_level(limits._Stream(iter([body])), {limits.ROWS})
    assert struct.unpack("<H", found[limits.ROWS])[0] == 128


# Segmented palette LUTs (C.7.9.2) ------------------------------------------------------------

def doubling_lut(doublings: int) -> tuple[int, ...]:
    """One discrete entry, then indirect segments each repeating every segment before it."""
    words = [0, 1, 0x8000]
    for k in range(1, doublings + 1):
        words += [2, k, 0, 0]
    return tuple(words)


def palette(words: tuple[int, ...]) -> Dataset:
    ds = pydicom.dcmread(find("gdcm-US-ALOKA-16.dcm"))
    data = np.array(words, "<u2").tobytes()
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"Segmented{colour}PaletteColorLookupTableData", data)
    ds.SOPInstanceUID = generate_uid()
    return ds


def test_segmented_lut_length_follows_pydicom_expansion():
    from pydicom.pixels.processing import _expand_segmented_lut
    real = pydicom.dcmread(find("gdcm-US-ALOKA-16.dcm")).SegmentedRedPaletteColorLookupTableData
    for words in (doubling_lut(10), tuple(np.frombuffer(real, "<u2").tolist()),
                  (0, 3, 1, 2, 3, 1, 4, 9, 2, 2, 0, 0)):
        assert segmented_lut_entries(words, 16) == len(_expand_segmented_lut(words, "<H"))


def test_doubling_segmented_lut_is_refused_before_expansion():
    ds = palette(doubling_lut(40))  # 2^40 entries from 330 bytes
    with pytest.raises(RenderError, match=f"expands to more than {MAX_LUT_ENTRIES} entries"):
        render(ds)


def test_self_referencing_segmented_lut_is_refused():
    ds = palette((0, 1, 7, 2, 0, 3, 0))  # indirect, all segments from itself on: endless
    with pytest.raises(RenderError, match="segmented palette LUT"):
        render(ds)


# Overlays (C.9.2) -----------------------------------------------------------------------------

def test_overlay_over_the_budget_is_refused_before_unpacking():
    ds = overlay_over_the_budget()
    with pytest.raises(RenderError, match="overlay 6000 of 46341×46341 pixels is more than"):
        render(ds)


def overlay_over_the_budget() -> Dataset:
    return add_overlay(ct(), 46341, 46341, b"\xff" * 64)


def overlay_larger_than_the_image() -> Dataset:
    """4096² × 128 frames would be 268 MB of bits; the data hold only the first frame's rows
    over the 128² image, striped on its left half."""
    rows = np.zeros((128, 4096), bool)
    rows[::2, :64] = True
    return add_overlay(ct(), 4096, 4096, np.packbits(rows, bitorder="little").tobytes(), 128)


def test_overlay_larger_than_the_image_is_clipped_unpacking_only_its_rows():
    """Only the image's rows of the first frame are read, so data holding just those suffice."""
    ds = overlay_larger_than_the_image()
    columns = 4096
    shown = render(ds).pixels
    assert (shown[::2, :64] == 255).all()
    assert np.array_equal(shown[1::2], render(ct()).pixels[1::2])
    del ds[0x6000, 0x3000]
    add_overlay(ds, 4096, columns, b"\xff" * 100)
    with pytest.raises(RenderError, match="cannot read overlay 6000: its data hold 800 bits"):
        render(ds)


# Float and colour frames: temporaries stay small beside the frame ------------------------------

def big_frame(kind: str, side: int) -> Dataset:
    """A ``side``² frame of random values: float32 grey, 8-bit YBR_FULL, or 8-bit palette."""
    rng = np.random.default_rng(0)
    if kind == "float32":
        ds = float_frame(side)
        ds.FloatPixelData = rng.random((side, side), np.float32).tobytes()
        return ds
    ds = pydicom.dcmread(find("OBXXXX1A.dcm")) if kind == "palette" else ct()
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        ds.pop(keyword, None)
    samples = 1 if kind == "palette" else 3
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel = samples
    if kind == "ybr_full":
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "YBR_FULL", 0
    ds.PixelData = rng.integers(0, 256, side * side * samples, np.uint8).tobytes()
    return ds


CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from test_limits import big_frame, ct
from minipacs.render import render
render(ct())
ds = big_frame(sys.argv[2], int(sys.argv[3]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shown = render(ds)
print(json.dumps({"grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                  "shape": shown.pixels.shape}))
"""


@pytest.mark.parametrize("kind", ["float32", "ybr_full", "palette"])
def test_big_frames_render_without_whole_frame_temporaries(kind):
    """Measured in a fresh process (ru_maxrss is a peak), 4096² frames: float32 (64 MiB) took
    545 MB more with whole-frame float64 copies, YBR_FULL 1920 MB and palette 1199 MB with
    int64 ones; a chunk of rows at a time, about the 8-bit output and one chunk's temporaries
    (50, 91 and 76 MB)."""
    tests = Path(__file__).resolve().parent
    side = 4096
    done = subprocess.run([sys.executable, "-c", CHILD, str(tests), kind, str(side)],
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": f"{tests.parent / 'plugin'}:{tests}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    frame_mb = side * side * (4 if kind == "float32" else 3) / 2**20
    assert result["grew_kb"] < (1.5 * frame_mb + 64) * 1024, result  # 64 MB: a chunk's


# Sanitation: absurd window and rescale values -------------------------------------------------

def with_values(**values: str) -> Dataset:
    """A CT whose DS elements hold these exact strings, as a broken exporter writes them."""
    ds = ct()
    for keyword, text in values.items():
        ds.add_new(keyword, "DS", None)
        ds[keyword]._value = text
    buffer = io.BytesIO()
    ds.save_as(buffer)  # read back, as the plugin reads files
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("center, width", [("40", "inf"), ("40", "nan"), ("-9.22e18", "400"),
                                           ("abc", "400"), ("40", "abc")])
def test_absurd_or_unreadable_window_falls_back_to_minmax(center, width):
    """What DCMTK shows with +Wm, not the grey, black or white image its +Wi 1 shows."""
    shown = render(with_values(WindowCenter=center, WindowWidth=width))
    assert (shown.window_source, shown.window_center, shown.window_width) == ("minmax", 136.0, 2064.0)
    assert np.array_equal(shown.pixels, render(ct()).pixels)


@pytest.mark.parametrize("slope, intercept", [("nan", "-1024"), ("inf", "-1024"),
                                              ("1e308", "-1024"), ("1", "inf")])
def test_rescale_giving_absurd_values_is_refused(slope, intercept):
    """DCMTK renders these all black; an index row saying 'rendered' would hide the fault."""
    with pytest.raises(RenderError, match=r"Rescale Slope .* give modality values that are not "
                                          r"finite or beyond ±2\^53"):
        render(with_values(RescaleSlope=slope, RescaleIntercept=intercept))


def test_unreadable_rescale_is_ignored_as_dcmtk_does():
    shown = render(with_values(RescaleSlope="abc"))
    assert shown.rescale_slope is None and shown.window_source == "minmax"
