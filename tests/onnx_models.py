"""Small ONNX models with known outputs, built with the onnx package, for the scoring tests."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from minipacs import preprocess, reasons


def brightness_model(path: Path, size: int = 16, threshold: float = 0.5, version: str = "test-brightness",
                     preprocessing: str = preprocess.PREPROCESSING, metadata: dict | None = None,
                     input_shape: list | None = None, scale: float = 1.0, copies: int = 1) -> Path:
    """P(valid) = the mean of the preprocessed image: bright images are 'valid', dark ones not.

    For the checks of a reload, it can be made wrong: another ``input_shape`` than (n, size,
    size, 1), the mean times ``scale``, ``copies`` of it side by side."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, input_shape or ["n", size, size, 1])
    p_valid = helper.make_tensor_value_info("p_valid", TensorProto.FLOAT, ["n", copies])
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
             helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
             helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
             helper.make_node("Concat", ["scaled"] * copies, ["p_valid"], axis=1)]
    graph = helper.make_graph(nodes, "brightness", [image], [p_valid],
                              initializer=[numpy_helper.from_array(np.float32(scale), "scale")])
    return save(graph, path, size, threshold, version, preprocessing, metadata)


def save(graph, path: Path, size: int, threshold: float, version: str,
         preprocessing: str = preprocess.PREPROCESSING, metadata: dict | None = None) -> Path:
    """``graph`` as a model file with the metadata the plugin reads (``metadata`` added)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.helper.set_model_props(model, {
        preprocess.METADATA_PREPROCESSING: preprocessing,
        preprocess.METADATA_INPUT_SIZE: str(size),
        preprocess.METADATA_THRESHOLD: str(threshold),
        preprocess.METADATA_VERSION: version,
        preprocess.METADATA_POSITIVE: "valid",
        **(metadata or {}),
    })
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def reason_model(path: Path, slopes: dict[str, float], intercepts: dict[str, float] | None = None,
                 size: int = 16, threshold: float = 0.5, version: str = "test-reasons",
                 classes: tuple[str, ...] = reasons.CLASSES) -> Path:
    """The brightness model (P(valid) = the mean m of the preprocessed image) with a second
    output, as training exports: ``p_class`` = softmax over ``classes`` of slope·m + intercept
    (0 for a class not named), and the classes in the ``minipacs.classes`` metadata. Choosing the
    slopes chooses which class is likeliest at which brightness."""
    intercepts = intercepts or {}
    for name in (*slopes, *intercepts):
        assert name in classes, name
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", size, size, 1])
    p_valid = helper.make_tensor_value_info("p_valid", TensorProto.FLOAT, ["n", 1])
    p_class = helper.make_tensor_value_info("p_class", TensorProto.FLOAT, ["n", len(classes)])
    row = lambda values: np.array([[values.get(c, 0.0) for c in classes]], np.float32)  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
         helper.make_node("ReduceMean", ["flat"], ["p_valid"], axes=[1], keepdims=1),
         helper.make_node("Mul", ["p_valid", "slopes"], ["scaled"]),
         helper.make_node("Add", ["scaled", "intercepts"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["p_class"], axis=1)],
        "reasons", [image], [p_valid, p_class],
        initializer=[numpy_helper.from_array(row(slopes), "slopes"),
                     numpy_helper.from_array(row(intercepts), "intercepts")])
    return save(graph, path, size, threshold, version, metadata={reasons.METADATA_CLASSES: ",".join(classes)})


def window_model(path: Path, size: int = 16, threshold: float = 0.3, window_threshold: float = 0.9,
                 version: str = "test-window") -> Path:
    """The brightness model with a third output, as training exports a window head:
    ``p_window`` = the brightest pixel of the preprocessed image, so a crop around a white
    panel reaches the window threshold and one around a grey panel does not."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", size, size, 1])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 1]) for name in ("p_valid", "p_window")]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
         helper.make_node("ReduceMean", ["flat"], ["p_valid"], axes=[1], keepdims=1),
         helper.make_node("ReduceMax", ["flat"], ["p_window"], axes=[1], keepdims=1)],
        "window", [image], outputs)
    return save(graph, path, size, threshold, version, metadata={"minipacs.window_threshold": str(window_threshold)})
