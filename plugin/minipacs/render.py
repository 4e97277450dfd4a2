"""DICOM → 8-bit display pixels, following the grayscale pipeline of DICOM PS3.3 C.11.

Modality LUT (C.11.1) → VOI LUT (C.11.2) → Presentation (C.11.6, MONOCHROME1 inverted), each a
small pure function on numpy arrays. Colour images go to RGB (C.7.6.3.1.2). Training and the
plugin both render through :func:`render`, so a model never sees pixels the archive would not.
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


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
    window_source: str | None = None  # "dataset", "voi_lut" or "minmax"


def first_value(value) -> float | None:
    """The first of a possibly multi-valued numeric element (C.11.2.1.2 allows several windows)."""
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return float(value[0]) if len(value) else None
    return float(value)


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """VOI LUT Function LINEAR, PS3.3 C.11.2.1.2.1, onto 0..255.

    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped; ``width`` must be ≥ 1.
    """
    if width <= 1:
        # C.11.2.1.2.1: w = 1 is a threshold at c - 0.5.
        return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def minmax_window(values: np.ndarray) -> tuple[float, float]:
    """The window spanning all modality values: c = (min + max + 1) / 2, w = max - min + 1.

    This is what DCMTK's ``+Wm`` and Cornerstone do for images without a window, so such images
    are rendered rather than skipped.
    """
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    return (lo + hi + 1.0) / 2.0, hi - lo + 1.0


def invert(pixels: np.ndarray) -> np.ndarray:
    """MONOCHROME1: the minimum value is displayed white (C.7.6.3.1.2)."""
    return 255 - pixels


def to_uint8_color(rgb: np.ndarray, bits_stored: int) -> np.ndarray:
    """Scale RGB samples of ``bits_stored`` bits to 8 bits."""
    if rgb.dtype == np.uint8:
        return rgb
    top = float((1 << bits_stored) - 1) if bits_stored else float(rgb.max() or 1)
    return np.clip(np.rint(rgb.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _decode(ds: Dataset, frame: int) -> np.ndarray:
    try:
        ds.pixel_array_options(index=frame)
        return ds.pixel_array
    except Exception as exc:  # pydicom raises many types; the index records the message.
        raise RenderError(f"cannot decode pixel data: {type(exc).__name__}: {exc}") from exc


def _grayscale(ds: Dataset, stored: np.ndarray) -> tuple[np.ndarray, dict]:
    values = apply_modality_lut(stored, ds).astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        raise RenderError("pixel data holds NaN or infinite values")
    center = first_value(ds.get("WindowCenter"))
    width = first_value(ds.get("WindowWidth"))
    source = "dataset"
    if center is None or width is None or width <= 0:
        center, width = minmax_window(values)
        source = "minmax"
    pixels = window_linear(values, center, width)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = invert(pixels)
    return pixels, {
        "rescale_slope": float(ds.get("RescaleSlope", 1) or 1),
        "rescale_intercept": float(ds.get("RescaleIntercept", 0) or 0),
        "window_center": center,
        "window_width": width,
        "window_source": source,
    }


def render(ds: Dataset, frame: int = 0) -> Rendered:
    """Render one frame of ``ds`` for display: 8-bit grey or RGB."""
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise NoPixelData("no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except ValueError as exc:
        raise RenderError(f"invalid Number of Frames: {exc}") from exc
    if not 0 <= frame < frames:
        raise RenderError(f"frame {frame} out of range: the image has {frames} frame(s)")
    stored = _decode(ds, frame)
    params: dict = {}
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        pixels, params = _grayscale(ds, stored)
    elif photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)  # uint8 or uint16, after the palette's entry size
        pixels = to_uint8_color(rgb, 8 if rgb.dtype == np.uint8 else 16)
    elif stored.ndim == 3 and stored.shape[-1] == 3:
        # pydicom converts YBR_* to RGB while decoding.
        pixels = to_uint8_color(stored, int(ds.get("BitsStored", 8)))
    else:
        raise RenderError(f"unsupported Photometric Interpretation {photometric!r}")
    if pixels.ndim not in (2, 3) or 0 in pixels.shape:
        raise RenderError(f"unexpected decoded shape {stored.shape}")
    return Rendered(pixels=pixels, photometric=photometric, frames=frames, frame=frame, **params)


def encode_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of 8-bit grey or RGB pixels (zlib level 1: the encode dominates render time)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
