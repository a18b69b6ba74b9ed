"""Graph-level precision steps on an exported fp32 graph.

- ``quantize_per_row`` (``--precision int8``, the default int8): integer MatMuls with one scale per
  row of each activation (per token) computed from that row alone at run time, and int8 weights
  with one scale per output channel. A row's scale depends on nothing else in the batch, so an
  example's answer is the same alone and beside any batch-mates, bit for bit; the integer products
  are exact, and with 7-bit weights they are the same on every x86 CPU (see the function).
- ``quantize_weight_only`` (``--precision int8-weight-only``): every MatMul and Conv weight becomes
  int8 with one fp32 scale per output channel, read through a standard ``DequantizeLinear``;
  activations and compute stay fp32. ONNX Runtime folds the dequantisation into fp32 weights when
  the session is made (``export.bundle.session_options`` disables the QDQ fusions that would
  otherwise keep it per run): a quarter of fp32's size, fp32's speed and numbers.
- Both store embedding tables as int8 with one scale per row (``quantize_embedding_rows``), and
  leave the classifier (the CRF's emissions, the relation logits) in fp32.
- ``convert_fp16``: fp16 weights and compute, with fp32 inputs and outputs so that the server's
  arrays and the manifest's input types do not change with the precision.

Measured and not offered (docs/export.md): dynamic int8 (one activation scale per run over the
whole batch, pads included: valid F1 moved by up to 1.2 points between batch sizes 1, 16 and 64);
static int8 (QDQ, activation scales calibrated once on 512 training tweets: batch-independent and
fast, but 1.6 to 2.5 points of valid F1 lost on NER and 1.5 on RE, 0.5 to 1.1 still with the
worst-fitting layers kept in float); ONNX Runtime's 8-bit ``MatMulNBits`` (no faster than fp32
here); its offline transformer fusions (slower on this graph).

None of the steps renames or fuses the parameters' initializers beyond what the manifest's
``weights`` table records (``export.weights``), so the PyTorch runtime reads the same tensors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "PER_ROW_SETTINGS",
    "PER_ROW_WEIGHT_BITS",
    "WEIGHT_ONLY_SETTINGS",
    "convert_fp16",
    "float_activation_twin",
    "quantize_embedding_rows",
    "quantize_per_row",
    "quantize_weight_only",
    "quantize_weights",
]

# Recorded in the manifest (``quantization``) of every int8 bundle.
PER_ROW_SETTINGS: dict[str, Any] = {
    "method": "int8 with per-row activation scales: MatMulInteger of uint8 rows and int8 weights",
    "activations": "uint8 around 128, one scale per row (token), max |row| / 127, computed at run time",
    "weights": "MatMul weights: 7-bit symmetric int8, one fp32 scale per output channel; Conv "
    "weights: int8, weight-only",
    "float": "LayerNorm, Softmax, GELU, attention products, residual additions, the classifier",
    "embeddings": "int8, one fp32 scale per row (Gathers of tables of >= 1024 rows)",
    "batch_independent": True,
}
WEIGHT_ONLY_SETTINGS: dict[str, Any] = {
    "method": "weight-only int8: DequantizeLinear of symmetric int8 weights, fp32 activations and compute",
    "weights": "MatMul and Conv weights, one fp32 scale per output channel",
    "embeddings": "int8, one fp32 scale per row (Gathers of tables of >= 1024 rows)",
    "batch_independent": True,
}
#: ``quantize_per_row``'s weights: 7 bits keep AVX2's saturating u8 x s8 pair sums exact.
PER_ROW_WEIGHT_BITS = 7
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


def quantize_weight_only(source: Path, target: Path) -> dict[str, dict[str, Any]]:
    """Weight-only int8 (see the module's docstring); returns what ``quantize_weights`` and
    ``quantize_embedding_rows`` replaced, for the manifest's ``weights`` table."""
    model = onnx.load(str(source))
    replaced = quantize_weights(model, skip=_classifier_nodes(model))
    replaced.update(quantize_embedding_rows(model))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return replaced


def quantize_per_row(
    source: Path, target: Path, weight_bits: int = PER_ROW_WEIGHT_BITS
) -> dict[str, dict[str, Any]]:
    """Int8 with per-row activation scales (``--precision int8``; see the module's docstring).

    Every MatMul with a weight (the classifier excepted) becomes: the scale of each row of its input
    (one token: ``max |x| / 127`` over that token's features), the row quantized to uint8 around
    128, ONNX Runtime's ``MatMulIntegerToFloat`` against int8 weights with one scale per output
    channel (applied in the integer GEMM's epilogue), then the row's scale. ``weight_bits`` 7 keeps
    every pair of u8 x s8 products below the int16 that AVX2's ``vpmaddubsw`` saturates at, so the
    integer results are the same on every x86 CPU; 8 is exact only with VNNI. An input shared by
    several MatMuls (a token's query, key and value) is quantized once. The patch projection (a
    Conv whose stride is its kernel: non-overlapping patches) becomes the same integer product on
    the patches' rows. Embedding tables are int8 per row. Returns what was replaced, for the
    manifest's ``weights`` table.
    """
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, not {weight_bits}")
    limit = 2 ** (weight_bits - 1) - 1
    model = onnx.load(str(source))
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    excluded = set(_classifier_nodes(model))
    constants = {
        "per_row_127": np.array(127.0, dtype=np.float32),
        "per_row_tiny": np.array(1e-12, dtype=np.float32),
        "per_row_one": np.array(1.0, dtype=np.float32),
        "per_row_zero_point": np.array(128, dtype=np.uint8),
        "per_row_weight_zero_point": np.array(0, dtype=np.int8),
    }
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    rows: dict[str, tuple[str, str]] = {}  # an input -> its uint8 rows and their scales
    replaced: dict[str, dict[str, Any]] = {}
    nodes: list[onnx.NodeProto] = []
    shapes = _static_shapes(model)

    def quantized_rows(source_name: str) -> tuple[str, str]:
        if source_name not in rows:
            p = f"per_row_{len(rows)}"
            nodes.extend(
                [
                    # max |x| per row: one |x| pass and one reduction (measured faster than
                    # max(ReduceMax x, -ReduceMin x), the same value)
                    helper.make_node("Abs", [source_name], [f"{p}_magnitude"], name=f"{p}_magnitude"),
                    helper.make_node(
                        "ReduceMax", [f"{p}_magnitude"], [f"{p}_top"], name=f"{p}_top", axes=[-1], keepdims=1
                    ),
                    helper.make_node(
                        "Max", [f"{p}_top", "per_row_tiny"], [f"{p}_nonzero"], name=f"{p}_nonzero"
                    ),
                    helper.make_node(
                        "Div", [f"{p}_nonzero", "per_row_127"], [f"{p}_scale"], name=f"{p}_scale"
                    ),
                    helper.make_node(
                        "Div", ["per_row_127", f"{p}_nonzero"], [f"{p}_inverse"], name=f"{p}_inverse"
                    ),
                    helper.make_node(
                        "Mul", [source_name, f"{p}_inverse"], [f"{p}_scaled"], name=f"{p}_scaled"
                    ),
                    helper.make_node(
                        "QuantizeLinear",
                        [f"{p}_scaled", "per_row_one", "per_row_zero_point"],
                        [f"{p}_uint8"],
                        name=f"{p}_uint8",
                    ),
                ]
            )
            rows[source_name] = (f"{p}_uint8", f"{p}_scale")
        return rows[source_name]

    def integer_weight(weight: onnx.TensorProto, axis: int) -> dict[str, Any]:
        """``weight`` as int8 with one scale per output channel (``axis``), stored once."""
        if weight.name not in replaced:
            replaced[weight.name] = _add_per_channel_int8(graph, weight, axis, limit)
        return replaced[weight.name]

    def integer_product(source_name: str, weight_int8: str, scale: str, output: str, p: str) -> None:
        """``output = source @ weight`` with ``source`` quantized by rows (``weight_int8``: (K, N))."""
        uint8_rows, row_scales = quantized_rows(source_name)
        nodes.extend(
            [
                # ONNX Runtime's integer GEMM, the columns' scales applied in its epilogue
                helper.make_node(
                    "MatMulIntegerToFloat",
                    [
                        uint8_rows,
                        weight_int8,
                        "per_row_one",
                        scale,
                        "per_row_zero_point",
                        "per_row_weight_zero_point",
                    ],
                    [f"{p}_columns"],
                    name=f"{p}_integer",
                    domain="com.microsoft",
                ),
                helper.make_node("Mul", [f"{p}_columns", row_scales], [output], name=f"{p}_rows"),
            ]
        )

    for node in graph.node:
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        usable = (
            weight is not None and weight.data_type == onnx.TensorProto.FLOAT and node.name not in excluded
        )
        if usable and node.op_type == "MatMul" and len(weight.dims) == 2:
            entry = integer_weight(weight, axis=1)
            integer_product(node.input[0], entry["tensor"], entry["scale"], node.output[0], node.name)
        elif usable and node.op_type == "Conv" and _patch_projection(node, weight, shapes):
            entry = integer_weight(weight, axis=0)
            _conv_as_rows(node, weight, entry, integer_product, nodes, graph, shapes[node.input[0]][1:])
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph, set(replaced))
    replaced.update(quantize_embedding_rows(model))
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return replaced


def _static_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Each tensor's shape as ONNX's shape inference knows it (ints where static, else names)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    return shapes


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _patch_projection(node: onnx.NodeProto, weight: onnx.TensorProto, shapes: dict[str, list]) -> bool:
    """A 2-D Conv over non-overlapping patches of an input of static channels, height and width that
    the patches tile: stride = kernel, no padding, dilation or groups."""
    if len(weight.dims) != 4:
        return False
    spatial = shapes.get(node.input[0], [None])[1:]
    if len(spatial) != 3 or not all(isinstance(d, int) and d > 0 for d in spatial):
        return False
    if spatial[1] % weight.dims[2] or spatial[2] % weight.dims[3]:
        return False
    kernel = list(weight.dims[2:])
    return (
        list(_attribute(node, "strides", [1, 1])) == kernel
        and not any(_attribute(node, "pads", [0, 0, 0, 0]))
        and list(_attribute(node, "dilations", [1, 1])) == [1, 1]
        and _attribute(node, "group", 1) == 1
    )


def _conv_as_rows(node, weight, entry, integer_product, nodes, graph, spatial) -> None:
    """A patch projection (N, C, H, W) -> (N, O, H/k, W/k) as an integer product on the patches'
    rows: (N, C, H, W) -> (N, H/k * W/k, C k k) @ (C k k, O) -> back to the Conv's layout.
    ``spatial``: the input's static (C, H, W). Shapes keep the N axis by ``0`` (copy), never
    ``-1``: N may be 0 (a batch without pictures)."""
    out_channels, channels, kh, kw = weight.dims
    _, height, width = spatial
    rows_h, rows_w = height // kh, width // kw
    p = node.name or node.output[0]
    constants = {
        f"{p}_patches": np.array([0, channels, rows_h, kh, rows_w, kw], dtype=np.int64),
        f"{p}_rows": np.array([0, rows_h * rows_w, channels * kh * kw], dtype=np.int64),
        f"{p}_kernel": np.array([out_channels, channels * kh * kw], dtype=np.int64),
        f"{p}_image": np.array([0, out_channels, rows_h, rows_w], dtype=np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    nodes.extend(
        [
            helper.make_node("Reshape", [node.input[0], f"{p}_patches"], [f"{p}_split"], name=f"{p}_split"),
            helper.make_node(
                "Transpose", [f"{p}_split"], [f"{p}_ordered"], name=f"{p}_ordered", perm=[0, 2, 4, 1, 3, 5]
            ),
            helper.make_node(
                "Reshape", [f"{p}_ordered", f"{p}_rows"], [f"{p}_patch_rows"], name=f"{p}_patch_rows"
            ),
            # (O, C, k, k) int8 -> (C k k, O): constant, folded once when the session is made
            helper.make_node(
                "Reshape", [entry["tensor"], f"{p}_kernel"], [f"{p}_kernel_rows"], name=f"{p}_kernel_rows"
            ),
            helper.make_node(
                "Transpose",
                [f"{p}_kernel_rows"],
                [f"{p}_kernel_columns"],
                name=f"{p}_kernel_columns",
                perm=[1, 0],
            ),
        ]
    )
    projected = f"{p}_projected"
    integer_product(f"{p}_patch_rows", f"{p}_kernel_columns", entry["scale"], projected, p)
    if len(node.input) > 2 and node.input[2]:
        nodes.append(helper.make_node("Add", [projected, node.input[2]], [f"{p}_biased"], name=f"{p}_biased"))
        projected = f"{p}_biased"
    nodes.extend(
        [
            helper.make_node(
                "Transpose", [projected], [f"{p}_channels_first"], name=f"{p}_channels_first", perm=[0, 2, 1]
            ),
            helper.make_node(
                "Reshape", [f"{p}_channels_first", f"{p}_image"], [node.output[0]], name=f"{p}_image"
            ),
        ]
    )


def _classifier_nodes(model: onnx.ModelProto) -> list[str]:
    """The MatMuls that make the graph's outputs (the emissions' or logits' classifier), found by
    walking back from the outputs through other ops: they stay in float, so the CRF and the
    softmax read unrounded scores."""
    producers = {output: node for node in model.graph.node for output in node.output}
    found, seen = [], set()
    pending = [output.name for output in model.graph.output]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            found.append(node.name)
            continue
        pending.extend(node.input)
    return found


# Which input of an op holds its weight, and the weight's output-channel axis there.
_WEIGHT_INPUTS = {"MatMul": (1, 1), "Conv": (1, 0)}


def float_activation_twin(source: Path, target: Path, weight_bits: int = PER_ROW_WEIGHT_BITS) -> None:
    """The fp32 graph at ``source`` with ``quantize_per_row``'s weights (the same int8 values and
    scales, read through ``DequantizeLinear``) and fp32 activations: what a model rebuilt from a
    per-row bundle's weights table computes, so the export can check that table exactly."""
    model = onnx.load(str(source))
    quantize_weights(model, skip=_classifier_nodes(model), weight_bits=weight_bits)
    quantize_embedding_rows(model)
    onnx.save(model, str(target))


def _add_per_channel_int8(
    graph: onnx.GraphProto, weight: onnx.TensorProto, axis: int, limit: int
) -> dict[str, Any]:
    """Adds ``weight`` to ``graph`` as int8 in [-limit, limit] with one symmetric scale per output
    channel (``axis``; an all-zero channel gets scale 1). Returns ``{"tensor", "scale", "axis"}``,
    the names of the two new initializers."""
    values = numpy_helper.to_array(weight)
    reduced = tuple(i for i in range(values.ndim) if i != axis)
    scales = (np.abs(values).max(axis=reduced) / np.float32(limit)).astype(np.float32)
    scales[scales == 0] = 1.0
    shape = [1] * values.ndim
    shape[axis] = -1
    integers = np.clip(np.rint(values / scales.reshape(shape)), -limit, limit).astype(np.int8)
    entry = {"tensor": f"{weight.name}_int8", "scale": f"{weight.name}_scale", "axis": axis}
    graph.initializer.extend(
        [numpy_helper.from_array(integers, entry["tensor"]), numpy_helper.from_array(scales, entry["scale"])]
    )
    return entry


def quantize_weights(
    model: onnx.ModelProto, skip: Collection[str] = (), weight_bits: int = 8
) -> dict[str, dict[str, Any]]:
    """Puts every fp32 MatMul/Conv weight initializer behind ``DequantizeLinear(int8, scale, axis)``
    (but the weights of the nodes named in ``skip``).

    Symmetric scales ``max |channel| / 127`` per output channel (zero point 0): an error of at
    most half a step of each channel's own scale. Returns ``{old name: {"tensor", "scale", "axis"}}``.
    """
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    replaced: dict[str, dict[str, Any]] = {}
    dequantize_nodes = []
    for node in graph.node:
        if node.op_type not in _WEIGHT_INPUTS or node.name in skip:
            continue
        position, axis = _WEIGHT_INPUTS[node.op_type]
        name = node.input[position] if len(node.input) > position else ""
        tensor = initializers.get(name)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) < 2:
            continue
        if name not in replaced:
            entry = _add_per_channel_int8(graph, tensor, axis, 2 ** (weight_bits - 1) - 1)
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
