"""ONNX Runtime sessions for the bundles: execution providers, threads, input feeding.

CUDA runs when onnxruntime-gpu is installed and a GPU is present (``providers=auto``), else
the CPU; the provider a session really got (ONNX Runtime falls back silently when CUDA cannot
start) is what the service reports at start-up, in /ready and in ``imm_model_info``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger("service.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA}

# ONNX tensor element types to numpy dtypes, for the inputs a graph declares.
_DTYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


class ProviderError(RuntimeError):
    """An execution provider was asked for that this onnxruntime build does not have."""


def select_providers(setting: str, available: Sequence[str] | None = None) -> list[str]:
    """The providers to ask ONNX Runtime for, in preference order (CPU always last, as the fallback).

    ``auto``: CUDA when this onnxruntime has it (onnxruntime-gpu), then CPU. ``cpu``, ``cuda``, or
    a comma-separated list of provider names: exactly those (an unavailable one is an error).
    """
    available = list(ort.get_available_providers() if available is None else available)
    if setting.strip().lower() == "auto":
        chosen = [CUDA] if CUDA in available else []
    else:
        chosen = []
        for name in (part.strip() for part in setting.split(",")):
            provider = _ALIASES.get(name.lower(), name)
            if provider not in available:
                raise ProviderError(
                    f"execution provider {provider} is not available (have: {', '.join(available)})"
                )
            if provider not in chosen:
                chosen.append(provider)
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def session_options(
    intra_op_threads: int, inter_op_threads: int, allow_spinning: bool = False
) -> ort.SessionOptions:
    """Session options; spinning off by default.

    ONNX Runtime's worker threads busy-wait after each run by default. On a few shared cores that
    steals the CPU the next request's parsing and image decoding need: measured on 2 cores, /ner
    p50 at concurrency 1 went from 200 to 115 ms (with an image) and 169 to 98 ms (text) with
    spinning off. Turn it on for a dedicated many-core machine.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if allow_spinning else "0")
    options.log_severity_level = 3  # errors only: CUDA fallback warnings are reported by us, once
    return options


class OnnxModel:
    """One ONNX Runtime session and the names and dtypes of its inputs and output."""

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str],
        options: ort.SessionOptions,
        output_name: str,
    ):
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        self.inputs = {i.name: _DTYPES.get(i.type) for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if output_name not in outputs:
            raise ValueError(f"{path} has no output {output_name!r} (it has {outputs})")
        self.output_name = output_name

    @property
    def provider(self) -> str:
        """The provider that runs the graph (the first ONNX Runtime kept)."""
        return self.session.get_providers()[0]

    def run(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """Feeds the graph's inputs from ``arrays`` (extra arrays such as ``word_mask`` are ignored)."""
        missing = [name for name in self.inputs if name not in arrays]
        if missing:
            raise KeyError(f"the batch lacks the graph inputs {missing}")
        feed = {
            name: np.ascontiguousarray(arrays[name], dtype=dtype) if dtype is not None else arrays[name]
            for name, dtype in self.inputs.items()
        }
        return self.session.run([self.output_name], feed)[0]
