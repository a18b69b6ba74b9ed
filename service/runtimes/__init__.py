"""Model runtimes: what runs a bundle's model on a batch. One small interface, two implementations.

``Runtime.infer(texts, images)`` takes a batch of encoded texts and their pictures and returns the
task's decoded output: for NER each word's CRF tag and confidence (``NEROutput``), for RE each
example's relation probabilities. The pipeline (``service.pipeline``) turns those into answers,
whichever runtime computed them.

- ``OnnxRuntime``: the bundle's ONNX graph on ONNX Runtime, CRF decoding in numpy. Torch-free:
  the CPU server. (CUDA too, where onnxruntime-gpu is installed: ``IMM_PROVIDERS``.)
- ``service.torch_runtime.TorchRuntime``: the same model rebuilt in PyTorch from the bundle's own
  weights, fp16 CUDA graphs, CRF decoding and JPEG decoding on the GPU. Imported only when chosen.

``IMM_RUNTIME=auto`` picks PyTorch when it is installed and sees a CUDA device, else ONNX Runtime;
the check never imports torch on a machine without an NVIDIA driver.
"""

from __future__ import annotations

import importlib.util
import io
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from PIL import Image

from export.bundle import Bundle, session_options
from model.decoding import crf_marginals, viterbi_decode
from model.preprocessing import EncodedText, Preprocessor
from service.settings import available_cores

if TYPE_CHECKING:
    from service.settings import Settings

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


@dataclass(frozen=True)
class EncodedImage:
    """A JPEG left undecoded for a runtime that decodes on its device (its header was checked)."""

    data: bytes
    width: int
    height: int


#: A picture as the pipeline hands it to a runtime: normalised pixels (3, S, S), or JPEG bytes.
Picture = np.ndarray | EncodedImage


@dataclass
class NEROutput:
    """Per example: the CRF's tag id for each of its words, and that tag's marginal probability."""

    tags: list[np.ndarray]
    confidence: list[np.ndarray]


class ProviderError(RuntimeError):
    """An execution provider was asked for that this onnxruntime build does not have."""


class Runtime(ABC):
    """Runs one bundle's model; called from the model's inference threads (several at once only where
    ``concurrent_calls``)."""

    #: Whether ``infer`` takes ``EncodedImage`` JPEGs (decoding them on its device).
    decodes_jpeg: bool = False
    #: Whether ``infer`` may run in several threads at once.
    concurrent_calls: bool = False

    def __init__(self, bundle: Bundle, preprocessor: Preprocessor):
        self.bundle = bundle
        self.preprocessor = preprocessor
        self.task = bundle.task

    @property
    @abstractmethod
    def provider(self) -> str:
        """What runs the model, as reported in /ready and imm_model_info."""

    @abstractmethod
    def infer(self, texts: Sequence[EncodedText], images: Sequence[Picture | None]) -> NEROutput | np.ndarray:
        """NER: ``NEROutput``; RE: relation probabilities (B, R) float64."""


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

    def infer(self, texts: Sequence[EncodedText], images: Sequence[Picture | None]) -> NEROutput | np.ndarray:
        arrays = self.preprocessor.collate(texts, images)
        output = self.run(arrays)
        if self.task == "re":
            return softmax(output)
        crf = self.bundle.crf
        assert crf is not None
        scores = (crf["transitions"], crf["start_transitions"], crf["end_transitions"])
        mask = arrays["word_mask"]
        paths = viterbi_decode(output, mask, *scores)
        marginals = crf_marginals(output, mask, *scores)
        tags = [np.asarray(path, dtype=np.int64) for path in paths]
        confidence = [marginals[row, np.arange(len(path)), path] for row, path in enumerate(tags)]
        return NEROutput(tags, confidence)


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


# --- choosing and building a runtime ---------------------------------------------------------------


def _nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def resolve_runtime(setting: str) -> str:
    """``onnx`` or ``torch`` for ``IMM_RUNTIME`` (``auto``: torch when it is installed and sees a GPU).

    ``auto`` imports torch only where an NVIDIA driver is present, so a CPU server stays torch-free
    even when torch happens to be installed beside it.
    """
    if setting != "auto":
        return setting
    if importlib.util.find_spec("torch") is None or not _nvidia_driver_present():
        return "onnx"
    import torch

    return "torch" if torch.cuda.is_available() else "onnx"


def inference_workers(settings: Settings) -> int:
    """Runtime calls per model at once (``IMM_INFERENCE_WORKERS``; 0: 2 for ONNX Runtime on a CPU of
    2 cores or more, else 1). Measured on 2 cores (docs/benchmarks.md): two one-thread calls side by
    side do about 10 % more rows per second than one two-thread call, and keep most of it while the
    event loop takes a core under overload."""
    if resolve_runtime(settings.runtime) == "torch":
        return 1
    if settings.inference_workers:
        return settings.inference_workers
    gpu = select_providers(settings.providers)[0] != CPU
    return 1 if gpu or available_cores() < 2 else 2


def intra_op_threads(settings: Settings) -> int:
    """ONNX Runtime's threads per call: ``IMM_INTRA_OP_THREADS``, or the cores shared among the workers."""
    return settings.intra_op_threads or max(1, available_cores() // inference_workers(settings))


def create_runtime(bundle: Bundle, preprocessor: Preprocessor, settings: Settings) -> Runtime:
    """The runtime ``settings`` ask for, loaded with ``bundle``."""
    kind = resolve_runtime(settings.runtime)
    if kind == "torch":
        if importlib.util.find_spec("torch") is None:
            raise ProviderError(
                "IMM_RUNTIME=torch needs PyTorch: install the gpu extra (pip install 'imm[gpu]')"
            )
        from service.torch_runtime import TorchRuntime

        return TorchRuntime(
            bundle,
            preprocessor,
            device=settings.device,
            cuda_graphs=settings.cuda_graphs,
            max_batch_size=settings.max_batch_size,
        )
    providers = select_providers(settings.providers)
    options = session_options(intra_op_threads(settings), settings.inter_op_threads, settings.ort_spinning)
    return OnnxRuntime(bundle, preprocessor, providers, options)


def jpeg_header(data: bytes, max_pixels: int) -> EncodedImage | None:
    """An ``EncodedImage`` for JPEG bytes whose header is sane and within ``max_pixels``, else None
    (the caller then takes the CPU path, which decodes what it can and names any problem)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):  # CMYK and others: Pillow's
                return None
    except Exception:  # noqa: BLE001 - whatever Pillow refuses is the CPU path's to report
        return None
    if width * height > max_pixels:
        return None
    return EncodedImage(data, width, height)
