"""DICOM → 8-bit display pixels: the grayscale and colour pipelines of DICOM PS3.3 C.11 and C.7.6.3.

Stored values → Modality LUT (C.11.1) → VOI LUT (C.11.2) → Presentation LUT (C.11.6) → overlays
(C.9.2), each a small pure function on numpy arrays. Where the standard leaves the arithmetic
open (how a real value becomes an 8-bit one), we do what DCMTK 3.6.7, the reference renderer,
does, so our PNGs are pixel-identical to ``dcm2pnm`` (tests/test_render_parity.py):

* modality values of integer data are truncated toward zero (DCMTK keeps an integer buffer);
* every real → 8-bit step truncates, and inversion (MONOCHROME1, shape INVERSE) swaps the output
  range inside the VOI function instead of computing ``255 - x`` afterwards.

Integer images go through a lookup table over their stored values (one table entry per value,
one indexing per pixel), never per-pixel float math. Training and the plugin both call
:func:`render`, so a model never sees pixels the archive would not.
"""

import struct
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from isal import isal_zlib
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from . import codestream

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# X-Ray Angiographic / RF: pixel values are not rescaled for display (DCMTK ignores their LUT).
XRAY_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.12.2",
                    "1.2.840.10008.5.1.4.1.1.12.3"}
MAX_FRAME_SAMPLES = 1 << 27  # 134 M samples (a 11585² grey frame): memory stays bounded
MAX_INSTANCE_SAMPLES = 1 << 34  # frames × rows × columns × samples a header may declare
MAX_TABLE = 1 << 16  # integer images with a wider stored range are transformed per pixel
MAX_LUT_ENTRIES = 1 << 16  # a LUT Descriptor counts at most 65536 entries (C.7.6.3.1.5, C.11.1.1)
# Modality values and windows beyond ±2^53 (where doubles skip integers) come from broken
# exporters (-2^63 as a window centre, slope 1e308): DCMTK shows them black, we refuse them.
MAX_MODALITY = float(1 << 53)
CHUNK_SAMPLES = 1 << 20  # per-pixel transforms and lookups run on this many samples at a time


#: Decodes frame N of the instance at hand into stored values, like pydicom's pixel_array.
Decoder = Callable[[int], np.ndarray]


class NoPixelData(Exception):
    """The instance holds no image (SR, RTPLAN, encapsulated PDF, ...)."""


class RenderError(Exception):
    """The instance has pixel data that cannot be decoded or displayed; the message says why."""


@dataclass(frozen=True)
class Rendered:
    """Display pixels and the parameters that produced them (stored in the index)."""

    pixels: np.ndarray  # uint8, (rows, columns) or (rows, columns, 3)
    photometric: str
    frames: int
    frame: int
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    window_center: float | None = None
    window_width: float | None = None
    window_source: str | None = None  # "dataset", "functional_group", "voi_lut" or "minmax"
    voi_function: str | None = None  # LINEAR, LINEAR_EXACT, SIGMOID, or None for a VOI LUT
    inverted: bool = False
    decoder: str = "pydicom"  # or "fallback": see decode()
    notes: str = ""  # what the decoder warned about


@dataclass(frozen=True)
class Lut:
    """A LUT of a Modality, VOI or palette sequence (C.11.1.1, C.11.2.1.1, C.7.6.3.1.5)."""

    first: int  # the stored value mapped to the first entry
    bits: int  # bits of each entry
    data: np.ndarray  # int64 entries

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """Values below the first entry map to it, above the last to the last (C.11.1.1)."""
        return self.data[np.clip(values, self.first, self.first + len(self.data) - 1) - self.first]


def read_lut(descriptor, data, little_endian: bool, signed: bool) -> Lut:
    """A LUT from its descriptor [entries (0 = 65536), first mapped value, bits] and data.

    OW data are raw bytes in the file's byte order; 8-bit entries may come packed two to a word.
    The first mapped value is signed when the values it maps are (C.11.1.1).
    """
    count, first, bits = (int(x) for x in descriptor)
    count = count or 65536
    if isinstance(data, bytes):
        words = np.frombuffer(data, "<u2" if little_endian else ">u2").astype(np.int64)
    else:
        words = np.asarray(data if isinstance(data, (list, MultiValue)) else [data], dtype=np.int64)
    if len(words) == (count + 1) // 2 and count > 1:  # 8 bits allocated: two entries per word
        words = np.frombuffer(words.astype("<u2").tobytes(), np.uint8)[:count].astype(np.int64)
    if not 8 <= bits <= 16:  # a wrong descriptor: trust the data (as DCMTK does)
        bits = min(16, max(8, int(words.max()).bit_length()))
    if signed and first >= 0x8000:
        first -= 0x10000
    return Lut(first, bits, words & ((1 << bits) - 1))


def first_value(value, index: int = 0) -> float | None:
    """Value ``index`` of a possibly multi-valued element (C.11.2.1.2 allows several windows);
    the last one when there are fewer. None when absent or not a number (``abc``), which
    DCMTK treats as absent too."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[min(index, len(value) - 1)] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# Decoding -----------------------------------------------------------------------------------

def decode(ds: Dataset, frame: int, fallback: Decoder | None = None) -> tuple[np.ndarray, str, str]:
    """Stored values of one frame, which decoder gave them ("pydicom" or "fallback"), and what
    the decoder warned about (excess padding, say), for the index.

    Uncompressed colour stays in its own colour space (converted below, as DCMTK does); JPEG
    decoders return YBR data as RGB, converted with the JPEG rounding DCMTK's codec uses too.
    ``fallback`` (Orthanc's decoder, in the plugin) is tried when pydicom's decoders fail."""
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # A bare data set (no Part 10 header, as Orthanc keeps some): its encoding as read.
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little is not False
                                          else ExplicitVRBigEndian)
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stored = pixel_array(ds, index=frame, raw=not syntax.is_compressed)
        notes = "; ".join(dict.fromkeys(str(w.message) for w in caught))
        return stored.astype(stored.dtype.newbyteorder("="), copy=False), "pydicom", notes
    except Exception as exc:  # pydicom raises many types; the index records the message.
        error = f"cannot decode pixel data ({syntax.name}): {type(exc).__name__}: {exc}"
        if fallback is None:
            raise RenderError(error) from exc
        try:
            return fallback(frame), "fallback", ""
        except Exception as second:
            raise RenderError(f"{error}; fallback decoder: {type(second).__name__}: {second}") from exc


def check_codestream(ds: Dataset, frame: int, frames: int) -> None:
    """Refuse a compressed frame whose own header (see :mod:`minipacs.codestream`) declares
    another geometry than the data set, or more samples than minipacs decodes: decoders size
    their output from that header, so a 600-byte frame could make them allocate gigabytes.
    A header that cannot be found or read is left to the decoder, as before."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if str(syntax) not in codestream.SYNTAXES or "PixelData" not in ds:
        return
    try:
        extended = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        data = get_frame(ds.PixelData, frame, number_of_frames=frames, extended_offsets=extended)
    except Exception:  # an encapsulation pydicom cannot split: its decoder says why below
        return
    found = codestream.geometry(syntax, data)
    if found is None:
        return
    try:
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError):  # the decoder reports it
        return
    why = codestream.problem(found, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0),
                             int(ds.get("SamplesPerPixel", 1) or 1), bits, len(data),
                             MAX_FRAME_SAMPLES)
    if why:
        raise RenderError(f"refused before decoding: {why}")


# Orthanc's pixel formats (orthanc.PixelFormat names) as numpy types and samples per pixel.
ORTHANC_FORMATS = {"GRAYSCALE8": ("u1", 1), "GRAYSCALE16": ("=u2", 1),
                   "SIGNED_GRAYSCALE16": ("=i2", 1), "GRAYSCALE32": ("=u4", 1),
                   "FLOAT32": ("=f4", 1), "RGB24": ("u1", 3), "RGB48": ("=u2", 3)}


def image_array(buffer: bytes, width: int, height: int, pitch: int, pixel_format: str) -> np.ndarray:
    """A decoded Orthanc image (rows of ``pitch`` bytes) as a numpy array of stored values."""
    if pixel_format not in ORTHANC_FORMATS:
        raise RenderError(f"Orthanc decoded to unsupported pixel format {pixel_format}")
    dtype, samples = ORTHANC_FORMATS[pixel_format]
    row = width * samples * np.dtype(dtype).itemsize
    rows = np.frombuffer(buffer, np.uint8)[:pitch * height].reshape(height, pitch)[:, :row]
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(height, width, samples)
    return pixels[..., 0] if samples == 1 else pixels


def _functional_group(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The item of ``sequence`` for ``frame`` in an enhanced multi-frame image (C.7.6.16)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > index and sequence in items[index] and items[index][sequence]:
            return items[index][sequence][0]
    return None


# Modality LUT (C.11.1) ------------------------------------------------------------------------

def rescale(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """Rescale Slope/Intercept (C.11.1.1.2), from the dataset or the frame's functional groups.

    Both must be numbers and the slope non-zero, as DCMTK requires (it ignores them otherwise)."""
    source = ds if "RescaleSlope" in ds else _functional_group(ds, frame, "PixelValueTransformationSequence")
    if source is None:
        return None
    slope, intercept = first_value(source.get("RescaleSlope")), first_value(source.get("RescaleIntercept"))
    return None if slope is None or intercept is None or slope == 0 else (slope, intercept)


def check_modality_range(values: np.ndarray, params: tuple[float, float]) -> None:
    """Refuse a rescale whose results are not finite or beyond ±2^53 (slope nan, inf, 1e308):
    DCMTK's integer buffer turns them into an all-black image, which says nothing."""
    if values.size and not -MAX_MODALITY <= values.min() <= values.max() <= MAX_MODALITY:
        raise RenderError(f"Rescale Slope {params[0]:g} and Intercept {params[1]:g} give modality "
                          "values that are not finite or beyond ±2^53")


def modality_lut(ds: Dataset, stored: np.ndarray, frame: int) -> tuple[np.ndarray, str | None]:
    """Modality values of ``stored``: the Modality LUT Sequence if any, else Rescale.

    Integer data stay integers (truncated toward zero); float pixel data stay floats.
    Returns the values and the rescale parameters used (as text, for the index), if any."""
    if str(ds.get("SOPClassUID", "")) in XRAY_SOP_CLASSES:
        return stored, None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if ds.get("ModalityLUTSequence"):
        item = ds.ModalityLUTSequence[0]
        lut = read_lut(item.LUTDescriptor, item.LUTData, _little_endian(ds), signed)
        return lut(stored.astype(np.int64)), None
    params = rescale(ds, frame)
    if params is None or params == (1.0, 0.0):
        return stored, None
    slope, intercept = params
    with np.errstate(over="ignore", invalid="ignore"):  # refused just below
        values = stored.astype(np.float64) * slope + intercept if slope != 1 else stored + intercept
    check_modality_range(values, params)
    if stored.dtype.kind in "iu":
        values = np.trunc(values).astype(np.int64)
    return values, params


def _little_endian(ds: Dataset) -> bool:
    encoding = getattr(ds, "original_encoding", (None, None))
    return encoding[1] is not False


# VOI LUT (C.11.2): each maps modality values onto [low, high]; low > high inverts ----------

def window_linear(values: np.ndarray, center: float, width: float,
                  low: float = 0.0, high: float = 255.0) -> np.ndarray:
    """VOI LUT Function LINEAR, C.11.2.1.2.1 (with the c - 0.5 and w - 1 terms).

    Written as offset + x·gradient in DCMTK's order of operations, so the truncation to 8 bits
    falls exactly where DCMTK's does. Width 1 is a threshold at c - 0.5."""
    values = np.asarray(values, dtype=np.float64)
    w1 = width - 1.0
    left, right = center - 0.5 - w1 / 2.0, center - 0.5 + w1 / 2.0
    if w1 == 0:
        inside = np.full(values.shape, low)
    else:
        span = high - low
        inside = (high - ((center - 0.5) / w1 + 0.5) * span) + values * (span / w1)
    out = np.where(values <= left, low, np.where(values > right, high, inside))
    return np.trunc(out).astype(np.uint8)


def window_linear_exact(values: np.ndarray, center: float, width: float,
                        low: float = 0.0, high: float = 255.0) -> np.ndarray:
    """VOI LUT Function LINEAR_EXACT, C.11.2.1.3.2: no half-pixel terms."""
    values = np.asarray(values, dtype=np.float64)
    out = ((values - center) / width + 0.5) * (high - low) + low
    out = np.where(values <= center - width / 2, low, np.where(values > center + width / 2, high, out))
    return np.trunc(out).astype(np.uint8)


def window_sigmoid(values: np.ndarray, center: float, width: float,
                   low: float = 0.0, high: float = 255.0) -> np.ndarray:
    """VOI LUT Function SIGMOID, C.11.2.1.3.1."""
    values = np.asarray(values, dtype=np.float64)
    return np.trunc((high - low) / (1.0 + np.exp(-4.0 * (values - center) / width)) + low).astype(np.uint8)


WINDOW_FUNCTIONS = {"LINEAR": window_linear, "LINEAR_EXACT": window_linear_exact,
                    "SIGMOID": window_sigmoid}


def apply_voi_lut(values: np.ndarray, lut: Lut, low: float = 0.0, high: float = 255.0) -> np.ndarray:
    """A VOI LUT Sequence item (C.11.2.1.1): its output range 0..2^bits maps onto low..high.

    DCMTK scales by (high - low + 1) / 2^bits; for a 16-bit LUT that is entry >> 8."""
    scale = (high - low + (1.0 if high >= low else -1.0)) / float(1 << lut.bits)
    return np.trunc(low + lut(np.asarray(values, dtype=np.int64)).astype(np.float64) * scale).astype(np.uint8)


def minmax_window(vmin: float, vmax: float) -> tuple[float, float]:
    """The window spanning all modality values: c = (min + max + 1) / 2, w = max - min + 1.

    What DCMTK's ``+Wm`` and Cornerstone do for images without a window, so such images are
    rendered rather than skipped."""
    return (vmin + vmax + 1.0) / 2.0, vmax - vmin + 1.0


# Presentation (C.11.6) ------------------------------------------------------------------------

def is_inverted(ds: Dataset) -> bool:
    """Whether the minimum value is displayed white: Presentation LUT Shape INVERSE, or
    MONOCHROME1 without a Presentation LUT Shape (C.7.6.3.1.2, C.11.6.1)."""
    shape = str(ds.get("PresentationLUTShape", "")).strip()
    if shape:
        return shape == "INVERSE"
    return str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"


# Grayscale ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Voi:
    """The VOI transformation chosen for an image, as recorded in the index."""

    source: str
    center: float | None = None
    width: float | None = None
    function: str | None = None
    lut: Lut | None = None

    def __call__(self, values: np.ndarray, low: float, high: float) -> np.ndarray:
        if self.lut is not None:
            return apply_voi_lut(values, self.lut, low, high)
        return WINDOW_FUNCTIONS[self.function](values, self.center, self.width, low, high)


def usable_window(center: float | None, width: float | None) -> bool:
    """A width below 1 is no window (C.11.2.1.2); neither is one not finite or beyond ±2^53,
    which would show every value as one grey instead of falling back to min-max."""
    return (center is not None and width is not None and 1 <= width <= MAX_MODALITY
            and -MAX_MODALITY <= center <= MAX_MODALITY)


def choose_voi(ds: Dataset, frame: int, vmin: float, vmax: float, index: int = 0) -> Voi:
    """The VOI of C.11.2: the window ``index`` (dataset, then the frame's functional groups),
    else VOI LUT ``index``, else the min-max window (see :func:`usable_window`)."""
    for source, item in (("dataset", ds),
                         ("functional_group", _functional_group(ds, frame, "FrameVOILUTSequence"))):
        if item is None:
            continue
        center = first_value(item.get("WindowCenter"), index)
        width = first_value(item.get("WindowWidth"), index)
        if usable_window(center, width):
            function = str(item.get("VOILUTFunction", "LINEAR")).strip() or "LINEAR"
            return Voi(source, center, width, function if function in WINDOW_FUNCTIONS else "LINEAR")
    luts = ds.get("VOILUTSequence")
    if luts:
        item = luts[min(index, len(luts) - 1)]
        lut = read_lut(item.LUTDescriptor, item.LUTData, _little_endian(ds), vmin < 0)
        return Voi("voi_lut", lut=lut)
    center, width = minmax_window(vmin, vmax)
    return Voi("minmax", center, width, "LINEAR")


def _offsets(stored: np.ndarray, lo: int) -> np.ndarray:
    """stored - lo, the index into a table starting at ``lo``; for 8/16-bit data computed in
    unsigned modular arithmetic, which is exact since the range is below 2^16, and cheap."""
    if stored.itemsize > 2:
        return stored.astype(np.int64) - lo
    unsigned = np.dtype(f"u{stored.itemsize}")
    return np.subtract(stored.view(unsigned), np.array(lo).astype(unsigned))


def _row_chunks(stored: np.ndarray):
    """Slices of rows holding about CHUNK_SAMPLES samples each."""
    step = max(1, CHUNK_SAMPLES // max(1, stored[0].size))
    return (slice(top, top + step) for top in range(0, len(stored), step))


def _lookup(table: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``table[offsets]`` along its first axis, a chunk of rows at a time: np.take copies its
    indices to int64 first, 8 bytes per sample of the whole frame."""
    out = np.empty(offsets.shape + table.shape[1:], table.dtype)
    for rows in _row_chunks(offsets):
        np.take(table, offsets[rows], axis=0, out=out[rows])
    return out


def _modality_extremes(ds: Dataset, stored: np.ndarray, frame: int) -> tuple[float, float]:
    """The smallest and largest modality value, a chunk at a time: a float64 copy of a whole
    float32 frame at the sample budget would take 1 GB, and each temporary as much again."""
    vmin, vmax = np.inf, -np.inf
    for rows in _row_chunks(stored):
        chunk = stored[rows]
        if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            raise RenderError("pixel data holds NaN or infinite values")
        values, _ = modality_lut(ds, chunk, frame)
        vmin, vmax = min(vmin, values.min()), max(vmax, values.max())
    return float(vmin), float(vmax)


def _grayscale(ds: Dataset, stored: np.ndarray, frame: int, window_index: int) -> tuple[np.ndarray, dict]:
    low, high = (255.0, 0.0) if is_inverted(ds) else (0.0, 255.0)
    if stored.dtype.kind in "iu":
        lo, hi = int(stored.min()), int(stored.max())
        table = hi - lo < MAX_TABLE
    else:
        table = False
    if table:
        # Transform each stored value that occurs once, then index: the values' order is kept.
        present = np.arange(lo, hi + 1, dtype=np.int64)
        values, params = modality_lut(ds, present, frame)
        offsets = _offsets(stored, lo)
        if ds.get("ModalityLUTSequence"):  # not monotonic: only the values that occur count
            used = np.bincount(offsets.ravel(), minlength=len(present)) > 0
            vmin, vmax = values[used].min(), values[used].max()
        else:
            vmin, vmax = values.min(), values.max()  # rescale is monotonic
        voi = choose_voi(ds, frame, float(vmin), float(vmax), window_index)
        pixels = _lookup(voi(values, low, high), offsets)
    else:  # per pixel, in chunks, so that temporaries stay small beside the frame
        vmin, vmax = _modality_extremes(ds, stored, frame)
        voi = choose_voi(ds, frame, vmin, vmax, window_index)
        pixels = np.empty(stored.shape, np.uint8)
        for rows in _row_chunks(stored):
            values, params = modality_lut(ds, stored[rows], frame)
            pixels[rows] = voi(values, low, high)
    slope, intercept = params if params else (None, None)
    return pixels, {"rescale_slope": slope, "rescale_intercept": intercept,
                    "window_center": voi.center, "window_width": voi.width,
                    "window_source": voi.source, "voi_function": voi.function,
                    "inverted": low > high}


# Colour (C.7.6.3.1.2) -------------------------------------------------------------------------

def to_8_bits(samples: np.ndarray, bits: int) -> np.ndarray:
    """Colour samples of ``bits`` bits → 8 bits: shifted down, or scaled up when fewer."""
    samples = samples.astype(np.int64)
    if bits > 8:
        return (samples >> (bits - 8)).astype(np.uint8)
    if bits < 8:
        return np.trunc(samples * (255.0 / ((1 << bits) - 1))).astype(np.uint8)
    return samples.astype(np.uint8)


def ybr_full_to_rgb(ybr: np.ndarray, bits: int, tables: bool = False) -> np.ndarray:
    """YBR_FULL / YBR_FULL_422 → RGB, C.7.6.3.1.2 equations, truncated and clipped to 0..2^bits-1.

    For 8-bit YBR_FULL (not 422) DCMTK adds pre-truncated terms from integer tables; so do we,
    since the two differ by up to 2 levels."""
    top = (1 << bits) - 1
    y, cb, cr = (ybr[..., i].astype(np.int64) for i in range(3))
    if tables:
        level = np.arange(256, dtype=np.float64)
        t = lambda a: np.trunc(a).astype(np.int64)  # noqa: E731
        r = y + t(1.4020 * level - 0.7010 * 255.0)[cr]
        g = y - t(0.3441 * level)[cb] - t(0.7141 * level - 0.5291 * 255.0)[cr]
        b = y + t(1.7720 * level - 0.8859 * 255.0)[cb]
        return np.clip(np.stack([r, g, b], axis=-1), 0, 255)
    y, cb, cr = (c.astype(np.float64) for c in (y, cb, cr))
    rgb = np.stack([y + 1.4020 * cr - 0.7010 * top,
                    y - 0.3441 * cb - 0.7141 * cr + 0.5291 * top,
                    y + 1.7720 * cb - 0.8859 * top], axis=-1)
    return np.trunc(np.clip(rgb, 0, top)).astype(np.int64)


def segmented_lut_entries(data: tuple[int, ...], bits: int, little_endian: bool = True) -> int:
    """How many entries a Segmented Palette Color LUT (C.7.9.2) expands to, walked as pydicom
    expands it (its words, or bytes for 8-bit entries) but without expanding: indirect segments
    repeat earlier ones, so a few KB of them, each doubling the last, grow without end.
    Refused past MAX_LUT_ENTRIES entries, or segments visited."""
    def offset(at: int) -> tuple[int, int]:  # an indirect segment's 32-bit offset, and its size
        if bits > 8:
            return data[at + 3] << 16 | data[at + 2], 4
        b = data[at + 2:at + 6]
        return (int.from_bytes(bytes(b), "little") if little_endian else
                (b[2] << 8 | b[3]) << 16 | (b[0] << 8 | b[1])), 6

    entries, visited = 0, 0
    stack = [[0, 0, 0]]  # per (nested) expansion: where it is, segments to read (0: all), read
    while stack:
        at, count, read = expansion = stack[-1]
        if at + 1 >= len(data) or (count and read == count):
            stack.pop()
            continue
        visited += 1
        kind, length = data[at], data[at + 1]
        if kind == 2:
            if at + (3 if bits > 8 else 5) >= len(data):
                break  # cut short: pydicom says so
            target, size = offset(at)
            stack.append([target, length, 0])
        else:  # discrete (length values) or linear (one); pydicom refuses other kinds
            entries, size = entries + length, 2 + (length if kind == 0 else 1)
        expansion[0], expansion[2] = at + size, read + 1
        if entries > MAX_LUT_ENTRIES or visited > MAX_LUT_ENTRIES:
            raise RenderError(f"segmented palette LUT expands to more than {MAX_LUT_ENTRIES} "
                              "entries (C.7.9.2)")
    return entries


def palette_to_rgb(ds: Dataset, indices: np.ndarray) -> tuple[np.ndarray, int]:
    """PALETTE COLOR through its three LUTs (C.7.6.3.1.5, C.7.9); returns RGB and entry bits."""
    if "SegmentedRedPaletteColorLookupTableData" in ds:
        little, bits = _little_endian(ds), int(ds.RedPaletteColorLookupTableDescriptor[2])
        dtype = np.dtype(("<" if little else ">") + ("u2" if bits > 8 else "u1"))
        for colour in ("Red", "Green", "Blue", "Alpha"):
            data = ds.get(f"Segmented{colour}PaletteColorLookupTableData")
            if data:
                words = np.frombuffer(data, dtype, len(data) // dtype.itemsize)
                segmented_lut_entries(tuple(words.tolist()), bits, little)
        rgb = apply_color_lut(indices, ds)
        return rgb, 8 if rgb.dtype == np.uint8 else 16
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    luts = [read_lut(ds[f"{c}PaletteColorLookupTableDescriptor"].value,
                     ds[f"{c}PaletteColorLookupTableData"].value, _little_endian(ds), signed)
            for c in ("Red", "Green", "Blue")]
    indices = indices.astype(np.int64)
    return np.stack([lut(indices) for lut in luts], axis=-1), max(lut.bits for lut in luts)


def _palette(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """PALETTE COLOR as 8-bit RGB through a table of the indices present, as for grey: never
    an int64 RGB copy of the whole frame. A LUT has at most 65536 entries (C.7.6.3.1.5)."""
    lo, hi = int(stored.min()), int(stored.max())
    if hi - lo >= MAX_LUT_ENTRIES:
        raise RenderError(f"PALETTE COLOR indices span {hi - lo + 1} values, more than a palette "
                          f"LUT's {MAX_LUT_ENTRIES} entries")
    rgb, bits = palette_to_rgb(ds, np.arange(lo, hi + 1, dtype=np.int64))
    return _lookup(to_8_bits(rgb, bits), _offsets(stored, lo))


def _colour(ds: Dataset, stored: np.ndarray, photometric: str, decoded_rgb: bool) -> np.ndarray:
    """8-bit RGB of a colour frame, a chunk of rows at a time (the int64 and float64
    temporaries of a whole frame at the sample budget would take gigabytes)."""
    if photometric == "PALETTE COLOR":
        return _palette(ds, stored)
    if stored.ndim != 3 or stored.shape[-1] != 3:
        raise RenderError(f"{photometric} image decoded to shape {stored.shape}, not 3 samples")
    bits = int(ds.get("BitsStored", 8))
    # Signed colour is shifted to unsigned.
    shift = 1 << (bits - 1) if int(ds.get("PixelRepresentation", 0)) == 1 else 0
    ybr = photometric in ("YBR_FULL", "YBR_FULL_422") and not decoded_rgb
    tables = photometric == "YBR_FULL" and bits == 8 and int(stored.max()) + shift < 256
    shown = np.empty(stored.shape, np.uint8)
    for rows in _row_chunks(stored):
        samples = stored[rows].astype(np.int64) + shift
        # RGB, and YBR_ICT/RCT/PARTIAL that the JPEG decoders already turned into RGB, as they are.
        shown[rows] = to_8_bits(ybr_full_to_rgb(samples, bits, tables) if ybr else samples, bits)
    return shown


# Overlays (C.9.2) -----------------------------------------------------------------------------

def overlay_rows(data: bytes, columns: int, first: int, last: int) -> np.ndarray:
    """Rows ``first``..``last`` - 1 of an overlay's first frame as booleans, unpacking only
    their bits: Overlay Data packs one bit per pixel, the first pixel in the lowest bit of the
    first byte (PS3.5 8.1.2, 8.2)."""
    start, stop = first * columns, last * columns
    if len(data) * 8 < stop:
        raise ValueError(f"its data hold {len(data) * 8} bits, fewer than its {stop} pixels")
    packed = np.frombuffer(data, np.uint8, count=-(-stop // 8) - start // 8, offset=start // 8)
    bits = np.unpackbits(packed, bitorder="little")[start % 8:start % 8 + stop - start]
    return bits.view(bool).reshape(last - first, columns)


def burn_overlays(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Overlay planes (groups 6000-601E, C.9.2) shown as white at their origin, as DCMTK does;
    the first frame of a multi-frame overlay. Only the part over the image is unpacked, and a
    plane of more than MAX_FRAME_SAMPLES pixels is refused: its bits would take gigabytes."""
    for group in range(0x6000, 0x6020, 2):
        if (group, 0x3000) not in ds:
            continue
        try:
            height, width = int(ds[group, 0x0010].value), int(ds[group, 0x0011].value)
            row, col = (int(v) - 1 for v in ds[group, 0x0050].value)  # Overlay Origin, 1-based
            data = ds[group, 0x3000].value
        except Exception as exc:
            raise RenderError(f"cannot read overlay {group:04X}: {exc}") from exc
        if height * width > MAX_FRAME_SAMPLES:
            raise RenderError(f"overlay {group:04X} of {height}×{width} pixels is more than "
                              f"minipacs renders ({MAX_FRAME_SAMPLES})")
        h, w = pixels.shape[:2]
        top, left = max(row, 0), max(col, 0)
        bottom, right = min(row + height, h), min(col + width, w)
        if bottom <= top or right <= left:
            continue
        try:
            plane = overlay_rows(data, width, top - row, bottom - row)
        except ValueError as exc:
            raise RenderError(f"cannot read overlay {group:04X}: {exc}") from exc
        pixels = pixels.copy()  # leave the caller's array alone
        pixels[top:bottom, left:right][plane[:, left - col:right - col]] = 255
    return pixels


# The pipeline ---------------------------------------------------------------------------------

def render(ds: Dataset, frame: int = 0, window_index: int = 0,
           fallback: Decoder | None = None) -> Rendered:
    """Render one frame of ``ds`` for display: 8-bit grey or RGB.

    ``window_index`` picks among several windows (or VOI LUTs); the last is used if there are
    fewer. ``fallback`` decodes frames pydicom cannot (see :func:`decode`)."""
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise NoPixelData("no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except ValueError as exc:
        raise RenderError(f"invalid Number of Frames: {exc}") from exc
    if not 0 <= frame < frames:
        raise RenderError(f"frame {frame} out of range: the image has {frames} frame(s)")
    samples = 1
    for keyword, default in (("Rows", 0), ("Columns", 0), ("SamplesPerPixel", 1)):
        try:
            samples *= int(ds.get(keyword, default) or default)
        except (TypeError, ValueError) as exc:
            raise RenderError(f"invalid {keyword}: {ds.get(keyword)!r}") from exc
    if samples > MAX_FRAME_SAMPLES:
        raise RenderError(f"a frame of {samples} samples is more than minipacs renders "
                          f"({MAX_FRAME_SAMPLES})")
    if frames * samples > MAX_INSTANCE_SAMPLES:
        raise RenderError(f"{frames} frames of {samples} samples are more than minipacs renders "
                          f"({MAX_INSTANCE_SAMPLES})")
    check_codestream(ds, frame, frames)
    stored, decoder, notes = decode(ds, frame, fallback)
    if stored.ndim not in (2, 3) or 0 in stored.shape:
        raise RenderError(f"unexpected decoded shape {stored.shape}")
    params: dict = {}
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if stored.ndim != 2:
            raise RenderError(f"{photometric} image decoded to shape {stored.shape}")
        pixels, params = _grayscale(ds, stored, frame, window_index)
    elif photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
                         "YBR_PARTIAL_420", "PALETTE COLOR"):
        pixels = _colour(ds, stored, photometric, ds.file_meta.TransferSyntaxUID.is_compressed)
    else:
        raise RenderError(f"unsupported Photometric Interpretation {photometric!r}")
    return Rendered(pixels=burn_overlays(pixels, ds), photometric=photometric, frames=frames,
                    frame=frame, decoder=decoder, notes=notes, **params)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", isal_zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG (ISO/IEC 15948) of 8-bit grey or RGB pixels: filter Up on every row, then deflate
    with ISA-L at ``compress_level`` (0–3).

    Chosen by measurement (bench/png_options.py): on CT/MR/CR slices, rows filtered with Up hold
    long runs, and ISA-L's level 1 deflates them 3× faster than zlib's fastest (level 1, run-length
    strategy) for 3 % more bytes; Pillow's adaptive filters are slower and larger still."""
    rows = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = rows.shape[:2]
    rows = rows.reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type Up: each byte minus the byte above it, modulo 256
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    data = isal_zlib.compress(filtered, compress_level)
    return b"".join((b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", data), _png_chunk(b"IEND", b"")))
