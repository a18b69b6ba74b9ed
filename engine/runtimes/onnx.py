"""ONNX Runtime: a bundle's ONNX graph, CRF decoding in numpy (``export.outputs``). Torch-free: the
CPU server. (CUDA too, where onnxruntime-gpu is installed: ``IMM_PROVIDERS``.)"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from engine.runtimes.base import ModelPicture, Runtime
from export.bundle import Bundle
from export.outputs import NEROutput, decode_outputs
from model.preprocessing import EncodedText, Preprocessor

__all__ = ["CPU", "CUDA", "OnnxRuntime", "ProviderError", "select_providers"]

log = logging.getLogger("engine.runtimes")

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


class OnnxRuntime(Runtime):
    """The bundle's ONNX graph on ONNX Runtime; CRF Viterbi and marginals in numpy. ONNX Runtime's
    ``run`` is thread-safe and ``infer`` keeps no state: calls may overlap."""

    concurrent_calls = True

    def __init__(
        self,
        bundle: Bundle,
        preprocessor: Preprocessor,
        providers: Sequence[str],
        options: ort.SessionOptions,
    ):
        super().__init__(bundle, preprocessor)
        self.session = ort.InferenceSession(
            str(bundle.model_path), sess_options=options, providers=list(providers)
        )
        self.inputs = {i.name: _DTYPES.get(i.type) for i in self.session.get_inputs()}
        self.output_name = bundle.output_names[0]
        if providers[0] == CUDA and self.provider != CUDA:
            log.warning(
                "%s: CUDA was asked for but could not start (no usable GPU?): running on %s",
                self.task,
                self.provider,
            )

    @property
    def provider(self) -> str:
        """The provider that runs the graph (the first ONNX Runtime kept)."""
        return self.session.get_providers()[0]

    def run(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's raw output for a collated batch (extra arrays such as ``word_mask`` are ignored)."""
        missing = [name for name in self.inputs if name not in arrays]
        if missing:
            raise KeyError(f"the batch lacks the graph inputs {missing}")
        feed = {
            name: np.ascontiguousarray(arrays[name], dtype=dtype) if dtype is not None else arrays[name]
            for name, dtype in self.inputs.items()
        }
        return self.session.run([self.output_name], feed)[0]

    def infer(
        self, texts: Sequence[EncodedText], images: Sequence[ModelPicture | None]
    ) -> NEROutput | np.ndarray:
        arrays = self.preprocessor.collate(texts, images)
        return decode_outputs(self.task, self.run(arrays), arrays["word_mask"], self.bundle.crf)
