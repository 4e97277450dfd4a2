"""The render pipeline's pieces on real files and on the standard's own definitions."""

import copy
import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from corpus import find
from minipacs.render import (Lut, NoPixelData, RenderError, apply_voi_lut, choose_voi,
                             encode_png, first_value, image_array, is_inverted, minmax_window,
                             read_lut, render, window_linear, window_linear_exact,
                             window_sigmoid)


def test_linear_window_borders_follow_c_11_2_1_2_1():
    c, w = 40.0, 400.0
    left, right = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    out = window_linear(np.array([left - 1, left, right, right + 0.01, c - 0.5]), c, w)
    assert out.tolist()[:2] == [0, 0]  # x <= c - 0.5 - (w-1)/2 → y min
    assert out[2] == 255 and out[3] == 255  # the line reaches 255 at the right border
    assert out[4] == 127  # the centre: 127.5, truncated


def test_linear_window_inverted_swaps_the_output_range():
    values = np.arange(-200, 300, 7, dtype=float)
    normal = window_linear(values, 40, 400).astype(int)
    inverted = window_linear(values, 40, 400, 255, 0).astype(int)
    # Not 255 - x: truncation goes the other way, so the two differ by at most one level.
    assert np.all(np.abs((255 - normal) - inverted) <= 1)
    assert inverted[0] == 255 and inverted[-1] == 0


def test_width_one_is_a_threshold_and_below_one_is_no_window():
    assert window_linear(np.array([9.0, 9.5, 10.0]), 10.0, 1.0).tolist() == [0, 0, 255]
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth = 10, 0.5
    voi = choose_voi(ds, 0, -5, 20)
    assert (voi.source, voi.center, voi.width) == ("minmax", 8.0, 26.0)


def test_linear_exact_has_no_half_pixel_terms():
    out = window_linear_exact(np.array([-100.0, 0.0, 50.0, 100.0, 101.0]), 50.0, 100.0)
    assert out.tolist() == [0, 0, 127, 255, 255]


def test_sigmoid_is_half_way_at_the_centre():
    out = window_sigmoid(np.array([-1e4, 40.0, 1e4]), 40.0, 400.0)
    assert out.tolist() == [0, 127, 255]


def test_minmax_window_spans_the_values():
    c, w = minmax_window(-1024.0, 3071.0)
    assert (c, w) == (1024.0, 4096.0)
    assert window_linear(np.array([-1024.0, 3071.0]), c, w).tolist() == [0, 255]


def test_first_value_of_multi_valued_window():
    ds = Dataset()
    ds.WindowCenter = ["40", "400"]
    assert first_value(ds.WindowCenter) == 40.0
    assert first_value(ds.WindowCenter, 1) == 400.0
    assert first_value(ds.WindowCenter, 5) == 400.0
    assert first_value(None) is None


def test_window_index_picks_among_several_windows():
    ds = pydicom.dcmread(find("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = ["600", "300"], ["800", "200"]
    assert render(ds).window_center == 600
    second = render(ds, window_index=1)
    assert (second.window_center, second.window_width) == (300, 200)


def test_voi_lut_function_from_the_dataset():
    ds = pydicom.dcmread(find("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 600, 800, "SIGMOID"
    shown = render(ds)
    assert shown.voi_function == "SIGMOID"
    assert np.array_equal(shown.pixels, window_sigmoid(ds.pixel_array, 600, 800))


def test_voi_lut_sequence_scales_its_output_range():
    lut = Lut(first=0, bits=16, data=np.array([0, 255, 256, 65535]))
    assert apply_voi_lut(np.array([-5, 1, 2, 3, 99]), lut).tolist() == [0, 0, 1, 255, 255]
    shown = render(pydicom.dcmread(find("vlut_04.dcm")))
    assert shown.window_source == "voi_lut" and shown.voi_function is None


def test_lut_data_follows_the_files_byte_order():
    little = read_lut([2, 0, 16], b"\x01\x00\x00\x01", little_endian=True, signed=False)
    big = read_lut([2, 0, 16], b"\x00\x01\x01\x00", little_endian=False, signed=False)
    assert little.data.tolist() == big.data.tolist() == [1, 256]
    signed = read_lut([2, 0xFFFE, 16], [5, 6], little_endian=True, signed=True)
    assert signed.first == -2 and signed(np.array([-9, -1, 7])).tolist() == [5, 6, 6]


def test_ct_without_window_is_rendered_over_its_full_range():
    ds = pydicom.dcmread(find("CT_small.dcm"))
    assert "WindowCenter" not in ds
    shown = render(ds)
    assert shown.pixels.dtype == np.uint8 and shown.pixels.shape == (128, 128)
    assert shown.window_source == "minmax"
    assert shown.pixels.min() == 0 and shown.pixels.max() >= 254
    assert shown.rescale_intercept == float(ds.RescaleIntercept)


def test_integer_table_equals_per_pixel_math():
    ds = pydicom.dcmread(find("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400
    values = np.trunc(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert np.array_equal(render(ds).pixels, window_linear(values, 40, 400))


def test_monochrome1_and_presentation_lut_shape():
    ds = pydicom.dcmread(find("MR_small.dcm"))
    assert not is_inverted(ds)
    mono1 = copy.deepcopy(ds)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    assert is_inverted(mono1) and render(mono1).inverted
    mono1.PresentationLUTShape = "IDENTITY"
    assert not is_inverted(mono1)
    ds.PresentationLUTShape = "INVERSE"
    normal, inverse = render(pydicom.dcmread(find("MR_small.dcm"))).pixels, render(ds).pixels
    assert np.all(np.abs((255 - normal.astype(int)) - inverse) <= 1)


def test_cr_monochrome1_from_pydicom_data():
    shown = render(pydicom.dcmread(find("RG1_UNCI.dcm")))
    assert shown.photometric == "MONOCHROME1" and shown.inverted and shown.pixels.ndim == 2


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "US1_J2KR.dcm", "OBXXXX1A.dcm", "SC_rgb_16bit.dcm",
                                  "SC_ybr_full_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_colour_images_become_8_bit_rgb(name):
    shown = render(pydicom.dcmread(find(name)))
    assert shown.pixels.dtype == np.uint8 and shown.pixels.shape[-1] == 3


def test_big_endian_palette_equals_little_endian():
    little = render(pydicom.dcmread(find("OBXXXX1A.dcm"))).pixels
    big = render(pydicom.dcmread(find("OBXXXX1A_expb.dcm"))).pixels
    assert np.array_equal(little, big)


def test_multiframe_renders_the_requested_frame():
    ds = pydicom.dcmread(find("emri_small.dcm"))
    first, last = render(ds, 0), render(ds, 9)
    assert first.frames == 10 and last.frame == 9
    assert not np.array_equal(first.pixels, last.pixels)
    with pytest.raises(RenderError, match="frame 10 out of range"):
        render(ds, 10)


def test_enhanced_ct_uses_its_functional_groups():
    shown = render(pydicom.dcmread(find("eCT_Supplemental.dcm")))
    assert shown.window_source == "functional_group" and shown.rescale_intercept is not None


def test_overlays_are_burned_in_white():
    ds = pydicom.dcmread(find("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    with_overlay = render(ds).pixels
    plane = ds.overlay_array(0x6000).astype(bool)
    del ds[0x6000, 0x3000]
    without = render(ds).pixels
    changed = with_overlay != without
    assert changed.any() and np.all(with_overlay[changed] == 255)
    assert changed.sum() <= plane.sum()


def test_object_without_pixels():
    with pytest.raises(NoPixelData):
        render(pydicom.dcmread(find("rtplan.dcm")))


def test_pixel_data_shorter_than_rows_times_columns_is_a_render_error():
    ds = pydicom.dcmread(find("CT_small.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(RenderError, match="cannot decode pixel data .Explicit VR Little Endian."):
        render(ds)


def test_fallback_decoder_is_used_when_pydicom_fails():
    ds = pydicom.dcmread(find("JPEG-lossy.dcm"))
    with pytest.raises(RenderError, match="JPEG Extended"):
        render(ds)
    frames = []

    def fallback(frame):
        frames.append(frame)
        return np.full((ds.Rows, ds.Columns), 100, dtype=np.uint16)

    shown = render(ds, fallback=fallback)
    assert frames == [0] and shown.decoder == "fallback"
    with pytest.raises(RenderError, match="fallback decoder: ValueError: no"):
        render(ds, fallback=lambda frame: (_ for _ in ()).throw(ValueError("no")))


def test_orthanc_image_buffers_with_padding_rows():
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    padded = np.zeros((3, 6), dtype=np.uint16)
    padded[:, :4] = pixels
    out = image_array(padded.tobytes(), 4, 3, 12, "GRAYSCALE16")
    assert np.array_equal(out, pixels)
    rgb = image_array(bytes(range(24)), 4, 2, 12, "RGB24")
    assert rgb.shape == (2, 4, 3) and rgb[1, 0].tolist() == [12, 13, 14]
    with pytest.raises(RenderError, match="BGRA32"):
        image_array(b"", 1, 1, 4, "BGRA32")


@pytest.mark.parametrize("name", ["CT_small.dcm", "US1_UNCI.dcm", "SC_rgb_small_odd.dcm"])
def test_png_round_trip(name):
    pixels = render(pydicom.dcmread(find(name))).pixels
    for level in (0, 1, 3):
        decoded = Image.open(io.BytesIO(encode_png(pixels, level)))
        assert decoded.mode == ("L" if pixels.ndim == 2 else "RGB")
        assert np.array_equal(np.asarray(decoded), pixels)


def test_png_of_a_single_row():
    pixels = np.array([[0, 255, 7]], dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(pixels)))), pixels)
