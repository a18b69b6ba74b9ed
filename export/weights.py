"""The model's weights inside a bundle's ONNX graph: where each parameter lives, and reading them back.

A bundle has one copy of the weights, the graph's initializers, which both runtimes read: ONNX
Runtime runs the graph, and the PyTorch runtime (``engine.runtimes.pytorch``) rebuilds the model
from ``model/`` and loads these same tensors into it. The manifest's ``weights`` table says, for
every parameter of the model's ``state_dict``, which initializer holds it and how:

    {"tensor": NAME, "shape": [...], "transpose": bool,         # a Linear's weight is stored (in, out)
     "scale": NAME, "axis": int,                                # int8: value = int8 * scale along axis
     "row": int}                                                # one row of the parameter (the rest unused)

The table is found by value, not by name: the exporter renames and deduplicates initializers
(equal tensors share one) and stores Linear weights transposed, so each parameter is looked up
by its exact bytes, directly or transposed. Parameters the graph does not use (the text token
type rows past the first, the last IA block's visual FFN) are absent; ``read_weights`` leaves
them to the caller, and the export checks that a model rebuilt from the table gives the graph's
outputs.

Needs numpy and onnx (the GPU runtime's extra), never torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["apply_quantization", "find_weights", "read_weights"]


def _fingerprint(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    contiguous = np.ascontiguousarray(array)
    return contiguous.dtype.str, contiguous.shape, hashlib.sha1(contiguous.tobytes()).hexdigest()


def find_weights(graph: Any, state_dict: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The ``weights`` table of an fp32 graph (an ``onnx.ModelProto``) for the model's ``state_dict``.

    Exact matches only: run it on the graph as exported, before any precision change.
    """
    from onnx import numpy_helper

    whole: dict[tuple, dict[str, Any]] = {}
    rows: dict[tuple, str] = {}
    for tensor in graph.graph.initializer:
        array = numpy_helper.to_array(tensor)
        whole.setdefault(_fingerprint(array), {"tensor": tensor.name, "transpose": False})
        if array.ndim == 2:
            whole.setdefault(_fingerprint(array.T), {"tensor": tensor.name, "transpose": True})
        if array.ndim == 1:
            rows.setdefault(_fingerprint(array), tensor.name)
    table: dict[str, dict[str, Any]] = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        found = whole.get(_fingerprint(value))
        if found is not None:
            table[name] = {**found, "shape": list(value.shape)}
            continue
        if value.ndim == 2:  # a table of which the graph uses one row (a constant-folded lookup)
            for number, row in enumerate(value):
                tensor = rows.get(_fingerprint(row))
                if tensor is not None:
                    table[name] = {
                        "tensor": tensor,
                        "transpose": False,
                        "row": number,
                        "shape": list(value.shape),
                    }
                    break
    return table


def apply_quantization(
    table: Mapping[str, dict[str, Any]], quantized: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The table after a precision step that replaced initializers: ``quantized`` maps an old
    initializer name to ``{"tensor": int8 name, "scale": scale name, "axis": axis}``."""
    updated = {}
    for name, entry in table.items():
        replacement = quantized.get(entry["tensor"])
        updated[name] = {**entry, **replacement} if replacement is not None else dict(entry)
    return updated


def read_weights(model_path: str | Path, table: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Every parameter of ``table`` as a float32 array of its own shape, dequantised and transposed back.

    A ``row`` entry gives a full-shape array with that row set and zeros elsewhere (rows the
    graph never reads).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path))
    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    cache: dict[str, np.ndarray] = {}

    def tensor(name: str) -> np.ndarray:
        if name not in cache:
            if name not in initializers:
                raise KeyError(f"{model_path} has no initializer {name!r} (named in the manifest's weights)")
            cache[name] = numpy_helper.to_array(initializers[name])
        return cache[name]

    weights = {}
    for name, entry in table.items():
        value = tensor(entry["tensor"]).astype(np.float32)
        if "scale" in entry:
            scale = tensor(entry["scale"]).astype(np.float32).reshape(-1)
            shape = [1] * value.ndim
            shape[entry["axis"]] = -1
            value = value * scale.reshape(shape)
        if entry.get("transpose"):
            value = value.T
        if "row" in entry:
            full = np.zeros(entry["shape"], dtype=np.float32)
            full[entry["row"]] = value
            value = full
        if list(value.shape) != list(entry["shape"]):
            raise ValueError(
                f"weight {name}: {entry['tensor']} gives shape {value.shape}, not {entry['shape']}"
            )
        weights[name] = np.ascontiguousarray(value)
    return weights
