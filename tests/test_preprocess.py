import numpy as np
import pydicom

from corpus import find
from minipacs.preprocess import batch, model_input
from minipacs.render import render


def test_grey_image_is_resized_into_unit_range():
    pixels = render(pydicom.dcmread(find("CT_small.dcm"))).pixels
    out = model_input(pixels, 64)
    assert out.shape == (64, 64, 1) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.9


def test_rgb_becomes_grey_with_luma_weights():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    assert np.allclose(model_input(rgb, 4), round(255 * 299 / 1000) / 255.0)


def test_same_size_is_not_resampled():
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    assert np.array_equal(model_input(pixels, 4)[..., 0] * 255, pixels.astype(np.float32))


def test_batch_stacks_images_of_any_shape():
    images = [np.zeros((10, 30), np.uint8), np.full((50, 20, 3), 255, np.uint8)]
    out = batch(images, 16)
    assert out.shape == (2, 16, 16, 1) and out[0].max() == 0 and out[1].min() == 1.0
