"""Decoder memory bombs: a compressed frame of a few hundred bytes whose own header claims
65535 × 65535 is refused before any decoder sizes its output from it; and the header readers
of minipacs.codestream agree with Rows/Columns on every real compressed file we have."""

import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import generate_uid

from corpus import find, pydicom_data_files, pydicom_test_files
from minipacs import codestream
from minipacs.render import RenderError, render

# Corrupt on purpose: a sequence delimiter inside its SIZ marker (refused, see below).
BROKEN = {"JPEG2000-embedded-sequence-delimiter.dcm"}


def compressed_files() -> list[Path]:
    found = []
    for path in pydicom_test_files() + pydicom_data_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except Exception:
            continue
        syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in dir(ds) else None
        if syntax is not None and syntax.is_compressed and path.name not in BROKEN \
                and "Rows" in ds and "PixelData" in ds:
            found.append(path)
    return found


def first_frame(ds: Dataset) -> bytes:
    return get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))


@pytest.mark.parametrize("path", compressed_files(), ids=lambda p: p.name)
def test_declared_geometry_of_real_files_equals_the_dataset(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    frame = first_frame(ds)
    found = codestream.geometry(ds.file_meta.TransferSyntaxUID, frame)
    assert found is not None, "header not found"
    if found.kind == "RLE":
        assert found.components == ds.SamplesPerPixel * -(-ds.BitsAllocated // 8)
        assert found.segments[0] == 64
    else:
        assert (found.rows, found.columns, found.components) == \
            (ds.Rows, ds.Columns, ds.SamplesPerPixel)
        assert 1 <= found.precision <= 16
    assert codestream.problem(found, ds.Rows, ds.Columns, ds.SamplesPerPixel,
                              ds.BitsAllocated, len(frame), 1 << 27) is None


def test_jp2_wrapper_is_skipped_to_its_codestream_box():
    frame = first_frame(pydicom.dcmread(find("JPEG2000.dcm")))
    signature = struct.pack(">I4s", 12, b"jP  ") + b"\r\n\x87\n"
    ftyp = struct.pack(">I4s", 20, b"ftyp") + b"jp2 " + bytes(4) + b"jp2 "
    header = struct.pack(">I4s", 8, b"jp2h")
    jp2 = signature + ftyp + header + struct.pack(">I4sQ", 1, b"jp2c", 16 + len(frame)) + frame
    assert codestream.j2k_geometry(jp2) == codestream.j2k_geometry(frame)
    assert codestream.j2k_geometry(frame).columns == 256


def test_jpeg_ls_oversize_dimensions_come_from_lse():
    """ISO/IEC 14495-1 C.2.4.1.4: X = Y = 0 in SOF55, the size in an LSE segment of ID 4."""
    sof = b"\xff\xf7" + struct.pack(">HBHHB", 8, 8, 0, 0, 1)
    lse = b"\xff\xf8" + struct.pack(">HBB", 2 + 2 + 8, 4, 4) + struct.pack(">II", 70000, 80000)
    found = codestream.jpeg_ls_geometry(b"\xff\xd8" + sof + lse + b"\xff\xda\x00\x08")
    assert (found.rows, found.columns) == (70000, 80000)
    assert "more than minipacs decodes" in codestream.problem(found, 512, 512, 1, 8, 100, 1 << 27)


def test_headers_that_cannot_be_read_are_left_to_the_decoder():
    for syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                   "1.2.840.10008.1.2.5"):
        assert codestream.geometry(syntax, b"") is None
        assert codestream.geometry(syntax, b"\xff\xd8" + bytes(range(256)) * 2) is None or \
            syntax == "1.2.840.10008.1.2.5"
    assert codestream.geometry("1.2.840.10008.1.2.4.50", b"\xff\xd8\xff\xc0\x00") is None


# Hostile files, made here from real ones ----------------------------------------------------

def _patch(ds: Dataset, offset_in_frame: int, new: bytes) -> Dataset:
    """``ds`` with ``new`` written over its first frame at ``offset_in_frame`` (same length,
    so the offset table stays right)."""
    frame = first_frame(ds)
    start = bytes(ds.PixelData).index(frame[:256])
    data = bytearray(ds.PixelData)
    data[start + offset_in_frame:start + offset_in_frame + len(new)] = new
    ds.PixelData = bytes(data)
    ds.SOPInstanceUID = generate_uid()
    return ds


def _sof(frame: bytes, marker: int) -> int:
    """Offset of the P byte of the frame header."""
    for found, pos, _ in codestream._jpeg_marker_segments(frame):
        if found == marker:
            return pos
    raise AssertionError("no SOF")


def jpeg(name: str, rows: int, columns: int, components: int | None = None) -> Dataset:
    ds = pydicom.dcmread(find(name))
    frame = first_frame(ds)
    marker = next(m for m, _, _ in codestream._jpeg_marker_segments(frame)
                  if m in codestream.JPEG_SOF | {codestream.JPEG_LS_SOF})
    pos = _sof(frame, marker)
    new = struct.pack(">HH", rows, columns)
    if components is not None:
        new += bytes([components])
    return _patch(ds, pos + 1, new)


def j2k(name: str, rows: int, columns: int) -> Dataset:
    ds = pydicom.dcmread(find(name))
    return _patch(ds, 8, struct.pack(">II", columns, rows))  # Xsiz, Ysiz after SOC, SIZ, Lsiz, Rsiz


def rle(name: str, header: tuple[int, ...]) -> Dataset:
    ds = pydicom.dcmread(find(name))
    return _patch(ds, 0, struct.pack(f"<{len(header)}I", *header))


def hostile() -> dict[str, tuple[Dataset, str]]:
    """name → (data set, regular expression of the reason it is refused)."""
    return {
        "jpeg_baseline_sof_65535": (jpeg("SC_rgb_jpeg_dcmtk.dcm", 65535, 65535),
                                    r"JPEG codestream claims 65535x65535x3, more than"),
        "jpeg_lossless_sof3_65535": (jpeg("JPEG-LL.dcm", 65535, 65535),
                                     r"JPEG codestream claims 65535x65535x1, more than"),
        "jpeg_ls_sof55_65535": (jpeg("emri_small_jpeg_ls_lossless.dcm", 65535, 65535),
                                r"JPEG-LS codestream claims 65535x65535x1, more than .*"
                                r"dataset says 64x64"),
        "j2k_siz_60000": (j2k("JPEG2000.dcm", 60000, 60000),
                          r"JPEG 2000 codestream claims 60000x60000x1, more than .*1024x256"),
        "jpeg_other_small_size": (jpeg("SC_rgb_jpeg_dcmtk.dcm", 200, 100),
                                  r"JPEG codestream claims 200x100 \(dataset says 100x100\)"),
        "jpeg_ls_more_components": (jpeg("emri_small_jpeg_ls_lossless.dcm", 64, 64, 3),
                                    r"JPEG-LS codestream claims 3 components .*is 1"),
        "rle_segment_count": (rle("MR_small_RLE.dcm", (15,)), r"RLE header declares 15 segments"),
        "rle_offsets_past_the_frame": (rle("MR_small_RLE.dcm", (2, 64, 1 << 30)),
                                       r"RLE segment offsets \[64, 1073741824\] do not fit"),
    }


@pytest.mark.parametrize("name", sorted(hostile()))
def test_hostile_header_is_refused_with_its_reason(name):
    ds, reason = hostile()[name]
    with pytest.raises(RenderError, match="refused before decoding: " + reason):
        render(ds)


def test_frames_times_samples_over_the_budget_is_refused():
    ds = pydicom.dcmread(find("emri_small_jpeg_ls_lossless.dcm"))
    ds.NumberOfFrames = 2**31 - 1
    with pytest.raises(RenderError, match="frames of 4096 samples are more than"):
        render(ds)


CHILD = r"""
import json, resource, sys, time, warnings
import pydicom
from minipacs.render import RenderError, render
warnings.simplefilter("ignore")
render(pydicom.dcmread(sys.argv[1]))  # decoders loaded and warmed on a real file
out = {}
for path in sys.argv[2:]:
    ds = pydicom.dcmread(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        render(ds)
        error = None
    except RenderError as exc:
        error = str(exc)
    out[path] = {"error": error, "seconds": time.perf_counter() - start,
                 "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}
print(json.dumps(out))
"""


def test_hostile_headers_are_refused_quickly_and_allocate_nothing(tmp_path):
    """In a fresh process (ru_maxrss is a peak): each refusal takes milliseconds and the peak
    resident memory grows by far less than the gigabytes the headers claim."""
    paths = {}
    for name, (ds, _) in hostile().items():
        paths[name] = tmp_path / f"{name}.dcm"
        ds.save_as(paths[name])
        assert paths[name].stat().st_size < 200_000
    plugin = Path(__file__).resolve().parent.parent / "plugin"
    done = subprocess.run([sys.executable, "-c", CHILD, str(find("SC_rgb_jpeg_dcmtk.dcm")),
                           *map(str, paths.values())], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(plugin), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for name, path in paths.items():
        result = results[str(path)]
        assert result["error"] and "refused before decoding" in result["error"], (name, result)
        assert result["seconds"] < 1.0, (name, result)
        assert result["grew_kb"] < 200_000, (name, result)
