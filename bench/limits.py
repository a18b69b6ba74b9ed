"""What the cores can do, and how much of it a model call uses: the limit line of ``make bench-model``.

``peak_rates(threads)`` times one large fp32 ``MatMul`` and one large ``MatMulInteger`` (uint8 x
int8, the kernel the int8 bundles run) on ONNX Runtime, the same library and threads as the model,
and returns their rates (GFLOP/s, GOP/s: a multiply-add counts 2). ``call_ops(model_path, feeds)``
counts the multiply-adds of one call of a bundle's graph on ``feeds`` (every MatMul, integer MatMul
and Conv, from the shapes the call really has), split into float and integer work.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

_MATMULS = ("MatMul", "MatMulInteger", "MatMulIntegerToFloat")
_INTEGER = ("MatMulInteger", "MatMulIntegerToFloat")


def _session(model, threads: int):
    import onnxruntime as ort

    from export.bundle import session_options

    return ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )


def peak_rates(threads: int, size: int = 1024, seconds: float = 2.0) -> dict[str, float]:
    """G(FL)OP/s of a (size x size) @ (size x size) product in fp32 and in uint8 x int8, on
    ``threads`` threads: the best of repeated runs for ``seconds`` each."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    rates = {}
    for kind, (a_type, b_array, op, out_type) in {
        "fp32": (
            TensorProto.FLOAT,
            rng.normal(size=(size, size)).astype(np.float32),
            "MatMul",
            TensorProto.FLOAT,
        ),
        "int8": (
            TensorProto.UINT8,
            rng.integers(-63, 64, size=(size, size)).astype(np.int8),
            "MatMulInteger",
            TensorProto.INT32,
        ),
    }.items():
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["y"])],
            f"peak-{kind}",
            [helper.make_tensor_value_info("a", a_type, [size, size])],
            [helper.make_tensor_value_info("y", out_type, [size, size])],
            [numpy_helper.from_array(b_array, "b")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = _session(model, threads)
        a = (
            rng.normal(size=(size, size)).astype(np.float32)
            if kind == "fp32"
            else rng.integers(0, 256, size=(size, size)).astype(np.uint8)
        )
        session.run(None, {"a": a})
        best, stop = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < stop:
            started = time.perf_counter()
            session.run(None, {"a": a})
            best = min(best, time.perf_counter() - started)
        rates[kind] = 2 * size**3 / best / 1e9
    return rates


def call_ops(model_path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Multiply-adds x 2 of one call of the graph at ``model_path`` on ``feeds``: {"float", "int8"}."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path))
    constants = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    wanted: dict[str, int] = {}  # the inputs whose shapes are needed, and their element types
    for node in model.graph.node:
        if node.op_type in (*_MATMULS, "Conv"):
            kinds = (
                (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
                if node.op_type in _INTEGER
                else (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT)
            )
            wanted |= {
                name: kind
                for name, kind in zip(node.input[:2], kinds)
                if name not in constants and name not in feeds
            }
    declared = {output.name for output in model.graph.output}
    for name, kind in wanted.items():
        if name not in declared:
            model.graph.output.append(helper.make_tensor_value_info(name, kind, None))
    names = list(wanted)
    session = _session(model, 1)
    shapes = {name: list(feeds[name].shape) for name in feeds}
    shapes |= {name: list(value.shape) for name, value in zip(names, session.run(names, feeds))}
    shapes |= constants
    ops = {"float": 0.0, "int8": 0.0}
    for node in model.graph.node:
        if node.op_type in _MATMULS:
            a, b = shapes[node.input[0]], shapes[node.input[1]]
            rows = float(np.prod(a[:-1]))  # every leading axis of A, broadcast batch axes included
            ops["int8" if node.op_type in _INTEGER else "float"] += 2 * rows * a[-1] * b[-1]
        elif node.op_type == "Conv":
            x, w = shapes[node.input[0]], shapes[node.input[1]]
            stride = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1, 1])
            out = [x[0], w[0], x[2] // stride[0], x[3] // stride[1]]
            ops["float"] += 2 * float(np.prod(out)) * w[1] * w[2] * w[3]
    return ops


class IntegerGemmsAlone:
    """The integer GEMMs of a bundle's graph and nothing else: each ``MatMulIntegerToFloat`` (or
    ``MatMulInteger``) node with its own weights, fed a uint8 input of the shape the model gives it
    for a batch of ``rows`` x ``pieces`` (an input per inner dimension), every product a graph
    output so that none is dropped. What a call of that model costs at the least on this CPU if
    every other op (quantisation, attention, LayerNorm, GELU, shapes) were free: a floor, not a
    model (its outputs mean nothing)."""

    def __init__(self, model_path: str | Path, threads: int = 1):
        import onnx
        from onnx import helper

        model = onnx.load(str(model_path))
        constants = {tensor.name: tensor for tensor in model.graph.initializer}
        nodes, inputs, self.widths = [], {}, set()
        for node in model.graph.node:
            if node.op_type not in _INTEGER:
                continue
            width = int(constants[node.input[1]].dims[0])  # the weights' inner dimension
            self.widths.add(width)
            name = f"a_{width}"
            inputs[name] = helper.make_tensor_value_info(
                name, onnx.TensorProto.UINT8, ["rows", "pieces", width]
            )
            out_type = onnx.TensorProto.INT32 if node.op_type == "MatMulInteger" else onnx.TensorProto.FLOAT
            copy = helper.make_node(
                node.op_type, [name, *node.input[1:]], [f"y{len(nodes)}"], domain=node.domain
            )
            copy.attribute.extend(node.attribute)
            nodes.append((copy, helper.make_tensor_value_info(f"y{len(nodes)}", out_type, None)))
        if not nodes:
            raise ValueError(f"{model_path} has no integer GEMM")
        wanted = {name for copy, _ in nodes for name in copy.input[1:]}
        graph = helper.make_graph(
            [copy for copy, _ in nodes],
            "integer-gemms-alone",
            list(inputs.values()),
            [output for _, output in nodes],
            [tensor for name, tensor in constants.items() if name in wanted],
        )
        floor = helper.make_model(graph, opset_imports=list(model.opset_import))
        self.session = _session(floor, threads)
        self._rng = np.random.default_rng(0)
        self._feeds: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def run(self, rows: int, pieces: int) -> None:
        feeds = self._feeds.get((rows, pieces))
        if feeds is None:  # made once per shape, so that the timing is the GEMMs'
            feeds = self._feeds[rows, pieces] = {
                f"a_{width}": self._rng.integers(0, 256, size=(rows, pieces, width), dtype=np.uint8)
                for width in self.widths
            }
        self.session.run(None, feeds)
