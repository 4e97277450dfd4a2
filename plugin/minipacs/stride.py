"""Finding a render whose rows were read at the wrong length.

When the row length a decoder uses is not the one the pixels were stored with (Columns or the
row stride wrong), the same samples come out in another layout, and two of them show in the
display pixels whatever the anatomy:

* **half width**: each stored row fills two display rows, its left half then its right half, so
  the image alternates between two interleaved pictures from one row to the next
  (:func:`interleaved`);
* **double width**: two stored rows fill one display row, so the image is a pair of copies side
  by side, one row apart, at twice the width and half the height (:func:`side_by_side`).

A scan changes smoothly from one row to the next: neighbouring rows differ less than rows two
apart, or about as much where noise dominates. Both checks compare the two on at most 128
columns and 128 row pairs, so a large radiograph costs what a 128² image does (0.1 ms).
Measured on the training data's valid renders, pydicom's corpus and orthanc-tests' real MR/CT,
and on row-stride renders of real and synthetic scans: docs/invalid-data.md.
"""

import numpy as np

#: Columns and row pairs read, at most.
LIMIT = 128
#: Half width: rows one apart differ this many times more than rows two apart (a scan: < 1).
COMB = 1.5
#: Double width: the two halves, one row apart, differ less than this share of what rows two
#: apart in one half do; and the image is at least this many times wider than tall (two
#: half-height copies of a scan at most 1.25 times taller than wide).
TWIN, WIDE = 0.9, 2.5
#: Mean grey step below which there is too little structure to tell (a near-blank render).
FLAT = 0.5


def wrong_row_length(pixels: np.ndarray) -> bool:
    """Whether ``pixels`` (uint8, grey or RGB) shows either layout of a wrong row length."""
    grey = pixels if pixels.ndim == 2 else pixels[..., 1]  # green: a wrong layout shows in each
    return interleaved(grey) or side_by_side(grey)


def interleaved(grey: np.ndarray) -> bool:
    """Rows alternate between two pictures: each differs from the next far more than from
    the one after it."""
    h, w = grey.shape
    if h < 8:
        return False
    rows, step = _sample(h - 2), _step(w)
    row, below, two_below = (grey[rows + k, ::step] for k in range(3))
    one, two = _mean_step(row, below), _mean_step(row, two_below)
    return one >= FLAT and one > COMB * two


def side_by_side(grey: np.ndarray) -> bool:
    """A wide image whose left and right halves are one picture, one row apart: each half's row
    is closer to the other half's same and next rows than to its own next row."""
    h, w = grey.shape
    if w % 2 or w < WIDE * h or h < 4:
        return False
    ys = _sample(h - 1)
    columns = np.arange(0, w // 2, _step(w // 2))
    left, right = grey[np.ix_(ys, columns)], grey[np.ix_(ys, columns + w // 2)]
    left_next = grey[np.ix_(ys + 1, columns)]
    across = (_mean_step(left, right) + _mean_step(right, left_next)) / 2
    down = _mean_step(left, left_next)
    return down >= FLAT and across < TWIN * down


def _sample(n: int) -> np.ndarray:
    """At most LIMIT row indices spread over range(n)."""
    return np.arange(0, n, _step(n))


def _step(n: int) -> int:
    return max(1, -(-n // LIMIT))


def _mean_step(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b).mean())
