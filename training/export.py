"""Keras → ONNX with tf2onnx, in the contract the plugin loads: input "image" (N, size, size, 1)
float32 with a dynamic batch, outputs "p_valid" (N, 1), "p_class" (N, classes) and, with a
window head, "p_window" (N, 1), and metadata naming the preprocessing, input size, thresholds,
version, positive class and classes."""

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx

from minipacs import preprocess, reasons, scoring
from training.model import with_p_valid, with_window

OPSET = 13


def to_onnx(model, path: Path, threshold: float, version: str, window=None,
            window_threshold: float | None = None) -> onnx.ModelProto:
    """``window``: the window head (:mod:`training.windowhead`) and its threshold, read off the
    model's own frozen features, so both heads share one pass."""
    size = int(model.input_shape[1])
    signature = (tf.TensorSpec((None, size, size, 1), tf.float32, name="image"),)
    exported = with_p_valid(model if window is None else with_window(model, window))
    names = ["p_valid", "p_class"] + ([scoring.WINDOW_OUTPUT] if window is not None else [])
    proto, _ = tf2onnx.convert.from_keras(exported, input_signature=signature, opset=OPSET)
    if [o.name for o in proto.graph.output] != names:
        raise RuntimeError(f"unexpected ONNX outputs {[o.name for o in proto.graph.output]}")
    metadata = {preprocess.METADATA_PREPROCESSING: preprocess.PREPROCESSING,
                preprocess.METADATA_INPUT_SIZE: str(size),
                preprocess.METADATA_THRESHOLD: str(threshold),
                preprocess.METADATA_VERSION: version,
                preprocess.METADATA_POSITIVE: "valid",
                reasons.METADATA_CLASSES: ",".join(reasons.CLASSES)}
    if window is not None:
        metadata[scoring.METADATA_WINDOW_THRESHOLD] = str(window_threshold)
    onnx.helper.set_model_props(proto, metadata)
    proto.producer_name = "minipacs-training"
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return proto


def max_difference(model, path: Path, x: np.ndarray, window=None, batch_size: int = 64) -> float:
    """Largest |Keras − ONNX Runtime| over the images ``x``, of p_class and (with ``window``) p_window."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ["p_class"] + ([scoring.WINDOW_OUTPUT] if window is not None else [])
    worst = 0.0
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        theirs = [model(chunk, training=False).numpy()]
        if window is not None:
            theirs.append(window(model.get_layer("features")(chunk, training=False), training=False).numpy())
        for ours, keras_values in zip(session.run(names, {"image": chunk}), theirs):
            worst = max(worst, float(np.abs(ours - keras_values).max()))
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
