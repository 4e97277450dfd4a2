"""Why an image is flagged: the vocabulary of reasons, and the checks that know one by
construction.

A reason is ``picture`` (a photograph, artwork, screenshot or document where a medical image
should be), ``overlay`` (a message box or burned-in text over an image) or ``broken_render``
with its sub-kind after a colon (``broken_render:blank``, ...). The anomaly model's classes are
``valid`` followed by these reasons, in this order; the model file names them in its metadata
(``METADATA_CLASSES``), so a model trained on another list is read with its own.

Two broken renders need no network: an image with (almost) one grey value is blank, and an
image whose window clips nearly every pixel to black or white shows nothing of its values.
Three more are read at the full resolution the network does not see, and in colour, which it
does not see either (it is fed grey): a picture in colour where a CT, MR, CR or DX image is
grey, rows read at the wrong length (:mod:`minipacs.stride`), and a GUI window burned in too
small for its 128-pixel view (:mod:`minipacs.windows`). All are read off the display pixels, so
ingest and rescoring (which reads the PNGs) agree.
"""

import numpy as np

from minipacs import stride, windows

PICTURE, OVERLAY, BROKEN = "picture", "overlay", "broken_render"
BROKEN_KINDS = ("blank", "clipped_window", "corrupted_rows", "truncated", "noise", "byte_order",
                "row_stride")
REASONS = (PICTURE, OVERLAY) + tuple(f"{BROKEN}:{kind}" for kind in BROKEN_KINDS)
CLASSES = ("valid",) + REASONS
#: The reason of a model that says only valid / not valid.
UNSPECIFIED = "anomaly"
#: The values ``/minipacs/anomalies?reason=`` takes: a reason, the family of broken renders, or
#: the reason of a binary model.
FILTERS = REASONS + (BROKEN, UNSPECIFIED)
#: Key of the ONNX metadata listing the model's classes, comma-separated, "valid" first.
METADATA_CLASSES = "minipacs.classes"

#: Display values spread over at most this many grey levels: nothing is shown (a black frame
#: with read-out noise of a few levels is still black).
BLANK_LEVELS = 4
#: A window that leaves no more than 0.3 % of the pixels between black and white clips the
#: image away; a bone or lung window keeps far more than that unclipped.
CLIPPED_SHARE = 0.997
#: CT, MR, CR and DX images are grey: their image modules allow only MONOCHROME1 and MONOCHROME2
#: (PS3.3 C.8.2.1, C.8.3.1, C.8.1.2, C.8.11.3). A render of which at least COLOUR_SHARE
#: of the pixels have channels CHROMA grey levels apart or more is a picture (a photograph,
#: artwork, a chart) or a colour map, not one of them; JPEG's chroma noise on a grey image and a
#: coloured marker or outline stay below both.
CHROMA, COLOUR_SHARE = 32, 0.05


def by_construction(pixels: np.ndarray) -> str | None:
    """``broken_render:blank`` or ``broken_render:clipped_window`` when the display pixels
    alone prove it, else None. Colour images are only checked for blankness (no window)."""
    if int(pixels.max()) - int(pixels.min()) < BLANK_LEVELS:
        return f"{BROKEN}:blank"
    # Every 4th pixel of every 4th row first: an ordinary image is told apart at 1/16 of the
    # cost (0.24 -> 0.03 ms at 512x512), a near-clipped one is then counted whole.
    if pixels.ndim == 2 and _extremes(pixels[::4, ::4]) >= 0.99 and _extremes(pixels) >= CLIPPED_SHARE:
        return f"{BROKEN}:clipped_window"
    return None


def checks(pixels: np.ndarray) -> str | None:
    """What the checks run before the network find, cheapest first: a broken render
    :func:`by_construction`, a ``picture`` in :func:`colour`, ``broken_render:row_stride`` for
    rows read at the wrong length (:func:`stride.wrong_row_length`), ``overlay`` for a window
    burned in (:func:`windows.window_box`); else None."""
    if found := by_construction(pixels):
        return found
    if colour(pixels):
        return PICTURE
    if stride.wrong_row_length(pixels):
        return f"{BROKEN}:row_stride"
    return OVERLAY if windows.window_box(pixels) is not None else None


def colour(pixels: np.ndarray) -> bool:
    """Whether at least COLOUR_SHARE of the pixels (every 2nd of every 2nd row) are coloured."""
    if pixels.ndim != 3:
        return False
    sample = pixels[::2, ::2]
    r, g, b = sample[..., 0], sample[..., 1], sample[..., 2]  # 25x faster than max(axis=2)
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return np.count_nonzero(chroma >= CHROMA) >= COLOUR_SHARE * chroma.size


def _extremes(pixels: np.ndarray) -> float:
    """The share of pixels that are black or white."""
    return (np.count_nonzero(pixels == 0) + np.count_nonzero(pixels == 255)) / pixels.size


def matches(reason: str | None, wanted: str) -> bool:
    """Whether ``reason`` is ``wanted`` or one of its sub-kinds (``broken_render`` matches
    ``broken_render:noise``)."""
    return reason is not None and (reason == wanted or reason.startswith(wanted + ":"))


def known(wanted: str) -> bool:
    """Whether ``wanted`` names a reason or a family of reasons (a valid ``?reason=``)."""
    return wanted == UNSPECIFIED or any(matches(reason, wanted) for reason in REASONS)
