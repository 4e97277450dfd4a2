"""minipacs.stride: renders whose rows were read at the wrong length.

Real CT, MR and CR files of pydicom's corpus are rendered by minipacs as they are, and with
Columns halved or doubled (Rows the other way), which is what a decoder with the wrong row
length makes of the same stored bytes. The wrong layouts must be found, and no render of the
corpus as it is (any modality, every frame) nor any CT/MR/CR/DX frame taken for one."""

import numpy as np
import pydicom
import pytest

from corpus import find, pydicom_data_files, pydicom_test_files, scan_frames
from minipacs import render, stride
from minipacs.scoring import Scorer
from onnx_models import brightness_model

#: Uncompressed real images of several sizes: CT 512², MR 64², MR 1024², CR 1955×1841 (MONOCHROME1).
HOSTS = ("693_UNCI.dcm", "MR_small.dcm", "MR2_UNCI.dcm", "RG1_UNCI.dcm")


def stored_with_row_length(name: str, factor: float) -> pydicom.Dataset:
    """The file with Columns ``factor`` times its true row length (Rows the other way)."""
    ds = pydicom.dcmread(find(name))
    ds.Columns, ds.Rows = int(ds.Columns * factor), int(ds.Rows / factor)
    return ds


def with_row_length(name: str, factor: float) -> np.ndarray:
    """The file's stored values rendered as rows of ``factor`` times their true length."""
    return render.render(stored_with_row_length(name, factor)).pixels


@pytest.mark.parametrize("name", HOSTS)
def test_half_and_double_row_lengths_are_found(name):
    assert not stride.wrong_row_length(render.render(pydicom.dcmread(find(name))).pixels)
    half, double = with_row_length(name, 0.5), with_row_length(name, 2)
    assert stride.interleaved(half) and stride.wrong_row_length(half)
    assert stride.side_by_side(double) and stride.wrong_row_length(double)


def test_a_wrong_row_length_is_flagged_whatever_the_model_says(tmp_path):
    lenient = Scorer(brightness_model(tmp_path / "lenient.onnx", threshold=0.0))  # never flags
    score = lenient.score(with_row_length("693_UNCI.dcm", 2))
    assert (score.flagged, score.anomaly_score, score.reason) == (True, 1.0, "broken_render:row_stride")
    assert not lenient.score(render.render(pydicom.dcmread(find("693_UNCI.dcm"))).pixels).flagged


def test_no_scan_of_the_real_corpus_is_taken_for_a_wrong_row_length():
    frames = list(scan_frames())
    assert len(frames) >= 30
    assert not [f"{name}[{frame}]" for name, frame, pixels in frames if stride.wrong_row_length(pixels)]


def test_nothing_else_in_the_corpus_either_but_a_dithered_photograph():
    """First frames of every file minipacs renders (US, secondary captures, NM, RT...): only
    the palette photograph, dithered in a checkerboard, has rows alternating (it is flagged a
    picture first, for its colour: tests/test_scoring.py)."""
    found = []
    for path in pydicom_test_files() + pydicom_data_files():
        try:
            pixels = render.render(pydicom.dcmread(path, force=True)).pixels
        except Exception:  # no pixel data, or data no decoder reads
            continue
        if stride.wrong_row_length(pixels):
            found.append(path.name)
    assert found == ["OT-PAL-8-face.dcm"]


def test_too_small_or_too_flat_to_tell():
    assert not stride.wrong_row_length(np.zeros((6, 6), np.uint8))
    assert not stride.wrong_row_length(np.full((40, 200), 90, np.uint8))
    stripes = np.zeros((64, 64), np.uint8)
    stripes[::2] = 200  # alternate rows: found as interleaved
    assert stride.interleaved(stripes)
