"""Finding a GUI window (an error dialog, a message box) burned into the display pixels.

The network sees every image at 128×128: a dialog a tenth of a 512-pixel image wide is 13
pixels there, a grey smudge, and goes through. At full resolution it is still what no scan has:
an axis-aligned rectangle whose top row is one even grey across its whole width, set off from
the row above, with straight left and right sides and a bottom edge of the same extent. Anatomy
has curved edges; the straight ones of a scan (a CT table, a radiograph's collimation, the
zero-filled band of a rectangular MR field of view) are either not closed on four sides, or are
the edge of a clipped (black or white) region, or span most of the image.

Such a box (:data:`STRICT`) is flagged as it is. A box drawn less clearly (:data:`LOOSE`: a dark
theme's black frame, less contrast, fewer rows) anatomy draws too, so it is only a candidate:
the model judges a crop around it (:func:`candidates`, :func:`crop`, ``scoring.Scorer``).

Measured on the training data's 9,000 valid renders and augmentations (real and synthetic),
pydicom's corpus and orthanc-tests' real MR/CT, and on real dialogs burned in at 5–60 % of the
width: docs/invalid-data.md.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: Largest step between neighbours along an edge row: a frame is even; resampling rings a little.
EVEN = 8
#: Images are checked on at most this many pixels a side (every 2nd, 3rd ... pixel beyond).
LIMIT = 512
#: A window is at least this wide (pixels of the checked image, and 4 % of its width) and at
#: most half the width: wider ones the network sees.
MIN_WIDTH, MAX_FRACTION = 20, 0.5


@dataclass(frozen=True)
class Rule:
    """How clearly a box must be drawn to count."""

    contrast: int  # grey levels between the two sides of an edge (a frame against the image)
    share: float  # share of an edge's length (or height) that must show the contrast
    min_height: int  # rows
    clipped: bool  # whether a frame may be black or white (else it is a clipped region's edge)
    aspect: tuple[float, float]  # least and most height / width


#: What no scan shows: flagged as it is (:func:`window_box`).
STRICT = Rule(contrast=20, share=0.7, min_height=6, clipped=False, aspect=(0.15, 1.2))
#: A box that may be a window: dark-theme frames, lower contrast, 5 rows. Anatomy draws such
#: boxes too (one valid render in nine), so the network judges a crop around each
#: (:func:`candidates`, :func:`crop`; ``scoring``). Landscape only: the 150 dialogs captured
#: for training are 0.12–0.67 times as tall as wide, while the boxed orientation letters that
#: scanners burn in (an "L" or "F" in a square frame) are square.
LOOSE = Rule(contrast=10, share=0.6, min_height=5, clipped=True, aspect=(0.15, 0.8))
#: At most this many candidate boxes per image are judged.
CANDIDATES = 4
#: A crop is this many times the box's longer side (the frame and what is around it), at
#: least CROP_MIN pixels.
CROP_MARGIN, CROP_MIN = 1.5, 32


def window_box(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (inclusive, in ``pixels``' coordinates) of a window burned into an
    8-bit grey display image, or None. Colour images are not checked: ultrasound screens carry
    boxes of their own (a Doppler region, colour bars), and a colour screenshot is the network's."""
    return next(_boxes(pixels, STRICT), None)


def candidates(pixels: np.ndarray, limit: int = CANDIDATES) -> list[tuple[int, int, int, int]]:
    """Up to ``limit`` distinct boxes drawn as :data:`LOOSE` allows (grey images only)."""
    found: list[tuple[int, int, int, int]] = []
    for box in _boxes(pixels, LOOSE):
        if not any(_same(box, other) for other in found):
            found.append(box)
            if len(found) == limit:
                break
    return found


def crop(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The square around ``box`` that the network judges: CROP_MARGIN times its longer side,
    kept inside the image (training and scoring crop alike)."""
    x0, y0, x1, y1 = box
    h, w = pixels.shape[:2]
    side = min(max(int(max(x1 - x0 + 1, y1 - y0 + 1) * CROP_MARGIN), CROP_MIN), h, w)
    left = min(max(0, (x0 + x1) // 2 - side // 2), w - side)
    top = min(max(0, (y0 + y1) // 2 - side // 2), h - side)
    return pixels[top:top + side, left:left + side]


def crops(images: Iterable[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """The crops around every image's candidate boxes, and the index of the image each comes
    from: what the window head judges, in training and in scoring alike (``images`` may be a
    generator: only the crops are kept)."""
    found, owners = [], []
    for n, pixels in enumerate(images):
        for box in candidates(pixels):
            found.append(crop(pixels, box))
            owners.append(n)
    return found, owners


def _same(a, b) -> bool:
    """Two finds of one box: the same sides within a few pixels (neighbouring edge rows)."""
    return max(abs(p - q) for p, q in zip(a, b)) <= max(4, (a[2] - a[0]) // 20)


def _boxes(pixels: np.ndarray, rule: Rule):
    """The boxes ``rule`` finds, top edges in order of rows."""
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        return
    step = max(1, -(-max(pixels.shape) // LIMIT))
    g = np.ascontiguousarray(pixels[::step, ::step])
    h, w = g.shape
    if min(h, w) < 2 * rule.min_height:
        return
    across = _step(g[:, 1:], g[:, :-1])                 # (h, w-1): pixel x+1 against x
    rows_differ = _step(g[1:], g[:-1]) >= rule.contrast   # (h-1, w): row y+1 against y
    edges = _top_edges(rows_differ[:, :-1] & (across[1:] <= EVEN), w)
    if edges is None:
        return
    ys, x0s, x1s = edges
    ys = ys + 1  # row i of the mask is the row below the edge
    # The sides must already show over the first rows, which rules out most edges cheaply.
    first = np.minimum(ys[:, None] + np.arange(rule.min_height), h - 1)
    sides = across >= rule.contrast
    left = np.max([sides[first, c[:, None]].mean(axis=1) for c in (x0s - 2, x0s - 1, x0s)], axis=0)
    right = np.max([sides[first, c[:, None]].mean(axis=1)
                    for c in (x1s - 1, x1s, np.minimum(x1s + 1, w - 2))], axis=0)
    for i in np.flatnonzero((left >= rule.share) & (right >= rule.share)):
        box = _closed_below(g, rows_differ, sides, rule, int(ys[i]), int(x0s[i]), int(x1s[i]))
        if box is not None:
            yield tuple(v * step for v in box)


def _step(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of uint8 images, in uint8 (half the memory traffic of int16)."""
    return np.maximum(a, b) - np.minimum(a, b)


def _top_edges(mask: np.ndarray, w: int):
    """Runs of ``mask`` (row i: the row below differs from the one above, and is even along)
    of a window's width, away from the image's sides; one-pixel gaps bridged."""
    mask[:, 1:-1] |= mask[:, :-2] & mask[:, 2:]
    least = int(max(MIN_WIDTH, 0.04 * w))
    # Only the rows that hold a long enough run, then their runs one by one.
    long_run, span = mask, 1  # long_run[y, x]: mask[y, x:x + span] all true
    while span < least and long_run.shape[1] > 1:
        shift = min(span, least - span)
        long_run, span = long_run[:, :-shift] & long_run[:, shift:], span + shift
    rows = np.flatnonzero(long_run.any(axis=1)) if span == least else []
    if not len(rows):
        return None
    edges = np.diff(np.pad(mask[rows], ((0, 0), (1, 1))).view(np.int8), axis=1)
    index, x0s = np.nonzero(edges == 1)
    x1s = np.nonzero(edges == -1)[1]  # the last even pair (x, x+1) ends at pixel x+1
    width = x1s - x0s + 1
    keep = (width >= least) & (width <= MAX_FRACTION * w) & (x0s >= 2) & (x1s <= w - 3)
    return (rows[index[keep]], x0s[keep], x1s[keep]) if keep.any() else None


def _closed_below(g, rows_differ, sides, rule: Rule, y0: int, x0: int, x1: int):
    """The box under the top edge ``y0, x0..x1``: the first row below that differs from the next
    over the same extent while both sides stay straight down to it; None if none does."""
    width = x1 - x0 + 1
    level = int(g[y0, (x0 + x1) // 2])
    if not rule.clipped and (level <= 2 or level >= 253):  # a clipped region's edge (air, a shutter)
        return None
    lo = y0 + max(rule.min_height - 1, int(rule.aspect[0] * width))
    hi = min(g.shape[0] - 2, y0 + int(rule.aspect[1] * width))
    if lo > hi:
        return None
    bottom = rows_differ[lo:hi + 1, x0:x1 + 1].mean(axis=1)
    height = np.arange(lo, hi + 1) - y0 + 1

    def side(columns):
        return np.max([np.cumsum(sides[y0:hi + 1, c])[lo - y0:] / height for c in columns], axis=0)

    w = g.shape[1]
    closed = (bottom >= rule.share) & (side((x0 - 2, x0 - 1, x0)) >= rule.share) & \
        (side((x1 - 1, x1, min(x1 + 1, w - 2))) >= rule.share)
    if not closed.any():
        return None
    return x0, y0, x1, lo + int(np.argmax(closed))
