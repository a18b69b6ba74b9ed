"""Graph-level precision steps on an exported fp32 graph.

- ``quantize_int8``: weight-only int8. Every MatMul and Conv weight becomes int8 with one fp32
  scale per output channel, read through a standard ``DequantizeLinear``; embedding tables are
  int8 with one scale per row. Activations stay fp32, so an example's answer never depends on
  the other examples of its batch (dynamic quantisation scales activations over the whole batch,
  pads included: valid F1 moved by up to 1.2 points between batch sizes 1, 16 and 64) nor on the
  CPU's integer kernels (u8s8 products saturate without AVX-512 VNNI). ONNX Runtime folds the
  dequantisation into fp32 weights when the session is made (``export.bundle.session_options``
  disables the QDQ fusions that would otherwise keep it per run): the file is a quarter of fp32's
  size and the compute is fp32's.
- ``convert_fp16``: fp16 weights and compute, with fp32 inputs and outputs so that the server's
  arrays and the manifest's input types do not change with the precision.

None of the steps renames or fuses the parameters' initializers beyond what the manifest's
``weights`` table records (``export.weights``), so the PyTorch runtime reads the same tensors.
Measured on the MiniLM NER graph, 1 thread of an AVX-512 VNNI Xeon, batch 16 with pictures:
fp32 as exported 242 ms, after ONNX Runtime's offline transformer fusions 273 ms (so they are not
used), weight-only int8 244 ms, ORT's dynamic int8 158 ms (batch-dependent, see above), ORT's
8-bit MatMulNBits 273 ms.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["INT8_SETTINGS", "convert_fp16", "quantize_embedding_rows", "quantize_int8", "quantize_weights"]

# Recorded in the manifest of every int8 bundle.
INT8_SETTINGS: dict[str, Any] = {
    "method": "weight-only int8: DequantizeLinear of symmetric int8 weights, fp32 activations and compute",
    "weights": "MatMul and Conv weights, one fp32 scale per output channel",
    "embeddings": "int8, one fp32 scale per row (Gathers of tables of >= 1024 rows)",
    "batch_independent": True,
}
_MIN_EMBEDDING_ROWS = 1024

_NOISY_LOGGERS = ("onnxruntime", "onnx_model", "fusion_base", "fusion_utils", "root")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's converters log every node they touch; keep the CLI's output readable."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantize_int8(source: Path, target: Path) -> dict[str, dict[str, Any]]:
    """Weight-only int8 (see the module's docstring); returns what ``quantize_weights`` and
    ``quantize_embedding_rows`` replaced, for the manifest's ``weights`` table."""
    model = onnx.load(str(source))
    replaced = quantize_weights(model)
    replaced.update(quantize_embedding_rows(model))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return replaced


# Which input of an op holds its weight, and the weight's output-channel axis there.
_WEIGHT_INPUTS = {"MatMul": (1, 1), "Conv": (1, 0)}


def quantize_weights(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """Puts every fp32 MatMul/Conv weight initializer behind ``DequantizeLinear(int8, scale, axis)``.

    Symmetric scales ``max |channel| / 127`` per output channel (zero point 0): an error of at
    most half a step of each channel's own scale. Returns ``{old name: {"tensor", "scale", "axis"}}``.
    """
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    replaced: dict[str, dict[str, Any]] = {}
    dequantize_nodes = []
    for node in graph.node:
        if node.op_type not in _WEIGHT_INPUTS:
            continue
        position, axis = _WEIGHT_INPUTS[node.op_type]
        name = node.input[position] if len(node.input) > position else ""
        tensor = initializers.get(name)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        if name not in replaced:
            values = numpy_helper.to_array(tensor)
            reduced = tuple(i for i in range(values.ndim) if i != axis)
            scales = (np.abs(values).max(axis=reduced) / np.float32(127.0)).astype(np.float32)
            scales[scales == 0] = 1.0
            shape = [1] * values.ndim
            shape[axis] = -1
            quantized = np.clip(np.rint(values / scales.reshape(shape)), -127, 127).astype(np.int8)
            entry = {"tensor": f"{name}_int8", "scale": f"{name}_scale", "axis": axis}
            graph.initializer.extend(
                [
                    numpy_helper.from_array(quantized, entry["tensor"]),
                    numpy_helper.from_array(scales, entry["scale"]),
                ]
            )
            dequantize_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [entry["tensor"], entry["scale"]],
                    [f"{name}_dequantized"],
                    name=f"{name}_dequantize",
                    axis=axis,
                )
            )
            replaced[name] = entry
        node.input[position] = f"{name}_dequantized"
    if replaced:
        nodes = [*dequantize_nodes, *graph.node]  # initializer-only nodes first: still topological
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused_initializers(graph, replaced)
    return replaced


def _drop_unused_initializers(graph: onnx.GraphProto, candidates) -> None:
    still_used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name not in candidates or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def quantize_embedding_rows(
    model: onnx.ModelProto, min_rows: int = _MIN_EMBEDDING_ROWS
) -> dict[str, dict[str, Any]]:
    """Rewrites each ``Gather`` of a large fp32 table as int8 rows times a per-row fp32 scale.

    ``Gather(table, ids)`` becomes ``Cast(Gather(rows_int8, ids)) * Gather(scales, ids)``, with
    symmetric scales ``max |row| / 127``: a quarter of the table's size, and an error of at most
    half a step of each row's own scale. Returns ``{table: {"tensor", "scale", "axis"}}`` for the
    tables rewritten.
    """
    graph = model.graph
    tables = {tensor.name: tensor for tensor in graph.initializer}
    nodes, rewritten = [], {}
    for node in graph.node:
        table = tables.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (
            table is None
            or axis != 0
            or table.data_type != onnx.TensorProto.FLOAT
            or len(table.dims) != 2
            or table.dims[0] < min_rows
        ):
            nodes.append(node)
            continue
        if table.name not in rewritten:
            values = numpy_helper.to_array(table)
            scales = np.abs(values).max(axis=1, keepdims=True) / np.float32(127.0)
            scales[scales == 0] = 1.0
            rows = np.clip(np.rint(values / scales), -127, 127).astype(np.int8)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(rows, f"{table.name}_rows_int8"),
                    numpy_helper.from_array(scales.astype(np.float32), f"{table.name}_row_scales"),
                ]
            )
            rewritten[table.name] = table
        prefix, ids, output = node.name or node.output[0], node.input[1], node.output[0]
        nodes += [
            helper.make_node(
                "Gather", [f"{table.name}_rows_int8", ids], [f"{prefix}_int8"], name=f"{prefix}_int8"
            ),
            helper.make_node(
                "Cast",
                [f"{prefix}_int8"],
                [f"{prefix}_float"],
                name=f"{prefix}_cast",
                to=onnx.TensorProto.FLOAT,
            ),
            helper.make_node(
                "Gather", [f"{table.name}_row_scales", ids], [f"{prefix}_scale"], name=f"{prefix}_scale"
            ),
            helper.make_node(
                "Mul", [f"{prefix}_float", f"{prefix}_scale"], [output], name=f"{prefix}_dequantize"
            ),
        ]
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused_initializers(graph, rewritten)
    return {
        name: {"tensor": f"{name}_rows_int8", "scale": f"{name}_row_scales", "axis": 0} for name in rewritten
    }


def convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and compute, fp32 inputs and outputs (initializers keep their names)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    with _quiet():
        # OnnxModel's conversion also sorts the graph again (the Casts it adds go at the end).
        model = OnnxModel(onnx.load(str(source)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(target))
