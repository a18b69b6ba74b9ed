"""Graph-level precision and speed steps on an exported fp32 graph (ONNX Runtime's own tools).

- ``optimize``: the transformer optimizer's fusions (attention, LayerNorm with residual, GELU with
  bias). The caller keeps the fused graph only where it still matches PyTorch.
- ``quantize_int8``: dynamic quantisation (int8 weights, activations quantised per batch at run
  time) for CPUs: no calibration data needed.
- ``convert_fp16``: fp16 weights and compute for GPUs, with fp32 inputs and outputs so that the
  server's arrays and the manifest's input types do not change with the precision.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from model.config import IMMConfig

__all__ = ["INT8_SETTINGS", "convert_fp16", "optimize", "quantize_int8"]

# Recorded in the manifest of every int8 bundle.
INT8_SETTINGS: dict[str, Any] = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "weight_type": "QInt8",
    "per_channel": True,
    "reduce_range": False,
    "op_types": ["MatMul", "Attention", "Gather"],
}

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
    """Dynamic int8 quantisation of the weights of MatMul, fused Attention and embedding Gathers.

    Per-channel weight scales: on a MiniLM-sized model they halve the output error of per-tensor
    ones. The patch projection (a Conv) stays fp32: ConvInteger was twice as slow as the fp32
    Conv here, and the projection is a small share of the weights.
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
    onnx.checker.check_model(str(target))
    return INT8_SETTINGS


def convert_fp16(source: Path, target: Path, config: IMMConfig, fuse: bool) -> dict[str, int]:
    """fp16 graph with fp32 inputs and outputs; ``fuse`` applies the GPU fusions first."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    with _quiet():
        # OnnxModel's conversion also sorts the graph again (the Casts it adds go at the end).
        model = _optimized_model(source, config, use_gpu=True) if fuse else OnnxModel(onnx.load(str(source)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(target))
        return _fusion_counts(model) if fuse else {}
