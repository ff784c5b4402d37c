"""Small deterministic ONNX embedding models for tests, built with ``onnx.helper`` (no weights to download).

Both models pool the image into an 8x8 grid per channel, project the 192 values with a fixed random matrix
(seeded, so every build is byte-identical) and L2-normalise the result:

* :func:`write_fp32_nchw_model`: FP32 ``[N, 3, 64, 64]`` input, already normalised by the client
  (``(pixel / 255 - mean) / std``), the layout of most exported vision models.
* :func:`write_uint8_nhwc_model`: UINT8 ``[N, 64, 64, 3]`` input; the graph casts, normalises with ``(x - 127) / 128``
  and transposes to NCHW itself, like the default model.

Each returns ``[N, dim]`` float32 embeddings. Also here: files that are *not* usable embedding models, for the
error-path tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 64
GRID = 8
DIM = 32
OPSET = 17
# IR version 8 is what opset 17 was released with: loadable by every ONNX Runtime that knows opset 17.
IR_VERSION = 8


def _projection(dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3 * GRID * GRID, dim)).astype(np.float32)


def _embedding_nodes(source: str, dim: int, seed: int):
    """Nodes and initialisers that turn an FP32 NCHW tensor named ``source`` into ``embedding``."""
    from onnx import helper, numpy_helper

    stride = SIZE // GRID
    nodes = [
        helper.make_node("AveragePool", [source], ["pooled"], kernel_shape=[stride, stride], strides=[stride, stride]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "projection"], ["projected"]),
        helper.make_node("LpNormalization", ["projected"], ["embedding"], axis=1, p=2),
    ]
    initialisers = [numpy_helper.from_array(_projection(dim, seed), name="projection")]
    return nodes, initialisers


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tiny_model")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_fp32_nchw_model(path: Path, dim: int = DIM, seed: int = 0, batch: int | str = "batch") -> Path:
    """FP32 NCHW ``[batch, 3, 64, 64]`` -> L2-normalised ``[batch, dim]``. ``batch`` may be a fixed number."""
    from onnx import TensorProto, helper

    nodes, initialisers = _embedding_nodes("image", dim, seed)
    graph = helper.make_graph(
        nodes,
        "tiny_fp32_nchw",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, dim])],
        initialisers,
    )
    return _save(graph, path)


def write_uint8_nhwc_model(path: Path, dim: int = DIM, seed: int = 1) -> Path:
    """UINT8 NHWC ``[batch, 64, 64, 3]`` -> L2-normalised ``[batch, dim]``; normalises inside the graph."""
    from onnx import TensorProto, helper, numpy_helper

    prologue = [
        helper.make_node("Cast", ["pixels"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["as_float", "offset"], ["centred"]),
        helper.make_node("Div", ["centred", "scale"], ["scaled"]),
        helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2]),
    ]
    nodes, initialisers = _embedding_nodes("nchw", dim, seed)
    initialisers += [
        numpy_helper.from_array(np.array(127.0, dtype=np.float32), name="offset"),
        numpy_helper.from_array(np.array(128.0, dtype=np.float32), name="scale"),
    ]
    graph = helper.make_graph(
        prologue + nodes,
        "tiny_uint8_nhwc",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        initialisers,
    )
    return _save(graph, path)


def write_two_input_model(path: Path) -> Path:
    """A valid ONNX model the pipeline cannot feed: it takes two inputs (image and a second tensor)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["image", "bias"], ["sum"]),
            helper.make_node("ReduceMean", ["sum"], ["embedding"], axes=[2, 3], keepdims=0),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])],
    )
    return _save(graph, path)


def reference_embeddings(path: Path, batch: np.ndarray) -> np.ndarray:
    """The model at ``path`` run in this process with ONNX Runtime (the ground truth the server must match)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: batch})
    return output
