"""A tiny face-recognition ONNX model for the tests of the face adapter and the feature cache:
NCHW ``[batch, 3, side, side]`` → global average pool → linear → ``[batch, dim]``."""

from __future__ import annotations

import numpy as np


def tiny_face_onnx(path, side: int = 112, dim: int = 8, batch="N") -> np.ndarray:
    """Write the model to ``path`` (``batch``: "N" for a dynamic batch, or a fixed int) and return
    its ``[3, dim]`` weight."""
    import onnx  # optional: the tests skip without it
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "face",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, dim])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w
