import copy

import numpy as np
import pydicom
import pytest
from PIL import Image
import io

from corpus import find
from minipacs.render import (NoPixelData, RenderError, encode_png, first_value, invert,
                             minmax_window, render, window_linear)


def test_linear_window_follows_ps3_3_c_11_2_1_2_1():
    c, w = 40.0, 400.0
    lo = c - 0.5 - (w - 1) / 2  # at or below: black
    hi = c - 0.5 + (w - 1) / 2  # above: white
    out = window_linear(np.array([lo - 1, lo, hi + 0.01, hi + 100, c - 0.5]), c, w)
    assert out[0] == 0 and out[1] == 0
    assert out[2] == 255 and out[3] == 255
    assert out[4] == 128  # the centre maps to the middle of the output range


def test_width_one_is_a_threshold():
    out = window_linear(np.array([9.0, 9.5, 10.0]), 10.0, 1.0)
    assert out.tolist() == [0, 0, 255]


def test_minmax_window_spans_the_values():
    c, w = minmax_window(np.array([-1024.0, 3071.0]))
    assert (c, w) == (1024.0, 4096.0)
    out = window_linear(np.array([-1024.0, 3071.0]), c, w)
    assert out.tolist() == [0, 255]


def test_first_value_of_multi_valued_window():
    ds = pydicom.Dataset()
    ds.WindowCenter = ["40", "400"]
    assert first_value(ds.WindowCenter) == 40.0
    assert first_value(None) is None


def test_ct_without_window_is_rendered_over_its_full_range():
    ds = pydicom.dcmread(find("CT_small.dcm"))
    assert "WindowCenter" not in ds
    shown = render(ds)
    assert shown.pixels.dtype == np.uint8 and shown.pixels.shape == (128, 128)
    assert shown.window_source == "minmax"
    assert shown.pixels.min() == 0 and shown.pixels.max() == 255
    assert shown.rescale_intercept == float(ds.RescaleIntercept)


def test_dataset_window_is_used_when_present():
    ds = pydicom.dcmread(find("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 600, 800
    shown = render(ds)
    assert (shown.window_center, shown.window_width, shown.window_source) == (600, 800, "dataset")
    values = ds.pixel_array.astype(float)
    assert np.array_equal(shown.pixels, window_linear(values, 600, 800))


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(find("MR_small.dcm"))
    mono2 = render(ds).pixels
    ds1 = copy.deepcopy(ds)
    ds1.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(render(ds1).pixels, invert(mono2))


def test_cr_monochrome1_from_pydicom_data():
    shown = render(pydicom.dcmread(find("RG1_UNCI.dcm")))
    assert shown.photometric == "MONOCHROME1" and shown.pixels.ndim == 2


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "US1_J2KR.dcm", "OBXXXX1A.dcm", "SC_rgb_16bit.dcm"])
def test_colour_images_become_8_bit_rgb(name):
    shown = render(pydicom.dcmread(find(name)))
    assert shown.pixels.dtype == np.uint8 and shown.pixels.shape[-1] == 3


def test_multiframe_renders_the_requested_frame():
    ds = pydicom.dcmread(find("emri_small.dcm"))
    first, last = render(ds, 0), render(ds, 9)
    assert first.frames == 10 and last.frame == 9
    assert not np.array_equal(first.pixels, last.pixels)
    with pytest.raises(RenderError, match="frame 10 out of range"):
        render(ds, 10)


def test_object_without_pixels():
    with pytest.raises(NoPixelData):
        render(pydicom.dcmread(find("rtplan.dcm")))


def test_pixel_data_shorter_than_rows_times_columns_is_a_render_error():
    ds = pydicom.dcmread(find("CT_small.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(RenderError, match="cannot decode pixel data"):
        render(ds)


def test_png_round_trip():
    pixels = render(pydicom.dcmread(find("CT_small.dcm"))).pixels
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(pixels))))
    assert np.array_equal(decoded, pixels)
