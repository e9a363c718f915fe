"""A tiny ONNX model with the real model's interface, built by the tests.

Input `input` float32 [1, 3, size, size] (IS-Net preprocessing), output
`output` float32 [1, 1, size, size]: sigmoid(8 * mean over channels), so
bright pixels become foreground. At the default 64 x 64 a job costs about a
millisecond of model time, which makes scheduling tests fast while going
through the same node pipeline as the real model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_tiny_model(path: Path, size: int = 64) -> Path:
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, size, size])
    scale = numpy_helper.from_array(np.array(8.0, dtype=np.float32), "scale")
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
        helper.make_node("Sigmoid", ["scaled"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [inp], [out], initializer=[scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
