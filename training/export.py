"""Keras → ONNX with tf2onnx, in the contract the plugin loads: input "image" (N, size, size, 1)
float32 with a dynamic batch, outputs "p_valid" (N, 1) and "p_class" (N, classes), and metadata
naming the preprocessing, input size, threshold, version, positive class and classes."""

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx

from minipacs import preprocess, reasons
from training.model import with_p_valid

OPSET = 13


def to_onnx(model, path: Path, threshold: float, version: str) -> onnx.ModelProto:
    size = int(model.input_shape[1])
    signature = (tf.TensorSpec((None, size, size, 1), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(with_p_valid(model), input_signature=signature, opset=OPSET)
    if [o.name for o in proto.graph.output] != ["p_valid", "p_class"]:
        raise RuntimeError(f"unexpected ONNX outputs {[o.name for o in proto.graph.output]}")
    metadata = {preprocess.METADATA_PREPROCESSING: preprocess.PREPROCESSING,
                preprocess.METADATA_INPUT_SIZE: str(size),
                preprocess.METADATA_THRESHOLD: str(threshold),
                preprocess.METADATA_VERSION: version,
                preprocess.METADATA_POSITIVE: "valid",
                reasons.METADATA_CLASSES: ",".join(reasons.CLASSES)}
    onnx.helper.set_model_props(proto, metadata)
    proto.producer_name = "minipacs-training"
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return proto


def max_difference(model, path: Path, x: np.ndarray, batch_size: int = 64) -> float:
    """Largest |Keras − ONNX Runtime| over the images ``x``."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        ours = session.run(["p_class"], {"image": chunk})[0]
        worst = max(worst, float(np.abs(ours - model(chunk, training=False).numpy()).max()))
    return worst


def latency_ms(path: Path, size: int, runs: int = 200) -> float:
    """Median milliseconds of one batch-of-one inference with ONNX Runtime on the CPU (the
    plugin's budget is 3 ms)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).random((1, size, size, 1), dtype=np.float32)
    times = []
    for _ in range(runs + 10):
        started = time.perf_counter()
        session.run(["p_valid"], {"image": image})
        times.append(time.perf_counter() - started)
    return float(np.median(times[10:]) * 1000)
