"""Graph-level precision and speed steps on an exported fp32 graph (ONNX Runtime's own tools).

- ``optimize``: the transformer optimizer's fusions (attention, LayerNorm with residual, GELU with
  bias). The caller keeps the fused graph only where it still matches PyTorch.
- ``quantize_int8``: dynamic quantisation (int8 weights, activations quantised per batch at run
  time) for CPUs: no calibration data needed; embedding tables int8 with one scale per row.
- ``convert_fp16``: fp16 weights and compute for GPUs, with fp32 inputs and outputs so that the
  server's arrays and the manifest's input types do not change with the precision.
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

from model.config import IMMConfig

__all__ = ["INT8_SETTINGS", "convert_fp16", "optimize", "quantize_embedding_rows", "quantize_int8"]

# Recorded in the manifest of every int8 bundle.
INT8_SETTINGS: dict[str, Any] = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "weight_type": "QInt8",
    "per_channel": True,
    "reduce_range": False,
    "op_types": ["MatMul", "Attention"],
    "embeddings": "int8, one fp32 scale per row (Gathers of tables of >= 1024 rows)",
}
_MIN_EMBEDDING_ROWS = 1024

_NOISY_LOGGERS = ("onnxruntime", "onnx_model", "fusion_base", "fusion_utils", "onnx_model_bert", "root")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The optimizer and quantizer log every fusion and skipped node; keep the CLI's output readable."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _fusion_options():
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    # The text embeddings are not BERT's (no segment ids, a fixed token type row): nothing to fuse.
    options.enable_embed_layer_norm = False
    return options


def _optimized_model(source: Path, config: IMMConfig, use_gpu: bool):
    from onnxruntime.transformers.optimizer import optimize_model

    backbone = config.backbone_config
    return optimize_model(
        str(source),
        model_type="bert",
        num_heads=backbone.num_attention_heads,
        hidden_size=backbone.hidden_size,
        optimization_options=_fusion_options(),
        opt_level=0,  # Python fusions only: the file stays portable, ORT optimises again at load
        use_gpu=use_gpu,
    )


def _fusion_counts(optimized) -> dict[str, int]:
    return {name: count for name, count in optimized.get_fused_operator_statistics().items() if count}


def optimize(source: Path, target: Path, config: IMMConfig) -> dict[str, int]:
    """Writes the CPU-fused graph to ``target``; returns the fused operator counts."""
    with _quiet():
        optimized = _optimized_model(source, config, use_gpu=False)
        optimized.save_model_to_file(str(target))
        return _fusion_counts(optimized)


def quantize_int8(source: Path, target: Path) -> dict[str, Any]:
    """Dynamic int8 quantisation of the weights of MatMul and fused Attention; int8 embedding rows.

    Per-channel weight scales: on a MiniLM-sized model they halve the output error of per-tensor
    ones. The embedding tables get one scale per row (``quantize_embedding_rows``) rather than
    ONNX Runtime's one per table: on the MNRE model that kept valid F1 at 58.04 against fp32's
    58.21, where a per-table int8 embedding lost 1.1 points. The patch projection (a Conv) stays
    fp32: ConvInteger was twice as slow as the fp32 Conv here, and it is a small share of the weights.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=INT8_SETTINGS["per_channel"],
            reduce_range=INT8_SETTINGS["reduce_range"],
            op_types_to_quantize=list(INT8_SETTINGS["op_types"]),
            # The fused graph's contrib ops (SkipLayerNormalization, ...) defeat ONNX shape
            # inference; their outputs are fp32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    model = onnx.load(str(target))
    quantize_embedding_rows(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return INT8_SETTINGS


def quantize_embedding_rows(model: onnx.ModelProto, min_rows: int = _MIN_EMBEDDING_ROWS) -> int:
    """Rewrites each ``Gather`` of a large fp32 table as int8 rows times a per-row fp32 scale.

    ``Gather(table, ids)`` becomes ``Cast(Gather(rows_int8, ids)) * Gather(scales, ids)``, with
    symmetric scales ``max |row| / 127``: a quarter of the table's size, and an error of at most
    half a step of each row's own scale. Returns the number of tables rewritten.
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
        still_used = {name for node in nodes for name in node.input}
        kept = [t for t in graph.initializer if t.name not in rewritten or t.name in still_used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return len(rewritten)


def convert_fp16(source: Path, target: Path, config: IMMConfig, fuse: bool) -> dict[str, int]:
    """fp16 graph with fp32 inputs and outputs; ``fuse`` applies the GPU fusions first."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    with _quiet():
        # OnnxModel's conversion also sorts the graph again (the Casts it adds go at the end).
        model = _optimized_model(source, config, use_gpu=True) if fuse else OnnxModel(onnx.load(str(source)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(target))
        return _fusion_counts(model) if fuse else {}
