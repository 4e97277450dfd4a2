"""Display pixels → model input: the one preprocessing that training and scoring share.

The anomaly model sees what the archive shows: the 8-bit render of :mod:`minipacs.render`,
turned grey and resized here. The ONNX model carries the name of this preprocessing and its
input size as metadata (``METADATA_*``), and the plugin refuses a model made for another one.
"""

import numpy as np
from PIL import Image

#: Name of this preprocessing, written into every exported model.
PREPROCESSING = "grey-bilinear-square-v1"
DEFAULT_SIZE = 128

# Keys of the ONNX model's metadata_props.
METADATA_PREPROCESSING = "minipacs.preprocessing"
METADATA_INPUT_SIZE = "minipacs.input_size"
METADATA_THRESHOLD = "minipacs.threshold"
METADATA_VERSION = "minipacs.model_version"
METADATA_POSITIVE = "minipacs.positive_class"  # "valid": the model outputs P(valid)


def model_input(pixels: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One image as a (size, size, 1) float32 array in [0, 1].

    RGB becomes grey with the ITU-R 601 luma weights (Pillow's "L" mode), then the image is
    resized to a square with Pillow's bilinear filter (which averages when it shrinks), aspect
    ratio not kept, as the predecessor did."""
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    if image.mode != "L":
        image = image.convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(image, dtype=np.float32) / 255.0)[..., np.newaxis]


def batch(images: list[np.ndarray], size: int = DEFAULT_SIZE) -> np.ndarray:
    """Several images as one (n, size, size, 1) float32 batch (NHWC, as Keras trains)."""
    return np.stack([model_input(pixels, size) for pixels in images])
