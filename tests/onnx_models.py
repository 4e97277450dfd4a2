"""Small ONNX models with known outputs, built with the onnx package, for the scoring tests."""

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from minipacs import preprocess


def brightness_model(path: Path, size: int = 16, threshold: float = 0.5, version: str = "test-brightness",
                     preprocessing: str = preprocess.PREPROCESSING) -> Path:
    """P(valid) = the mean of the preprocessed image: bright images are 'valid', dark ones not."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", size, size, 1])
    p_valid = helper.make_tensor_value_info("p_valid", TensorProto.FLOAT, ["n", 1])
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
         helper.make_node("ReduceMean", ["flat"], ["p_valid"], axes=[1], keepdims=1)],
        "brightness", [image], [p_valid])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.helper.set_model_props(model, {
        preprocess.METADATA_PREPROCESSING: preprocessing,
        preprocess.METADATA_INPUT_SIZE: str(size),
        preprocess.METADATA_THRESHOLD: str(threshold),
        preprocess.METADATA_VERSION: version,
        preprocess.METADATA_POSITIVE: "valid",
    })
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
