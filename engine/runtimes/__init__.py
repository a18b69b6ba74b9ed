"""Model runtimes: what runs a bundle's model on a batch. One interface (``base.Runtime``), two
implementations, one factory (``create_runtime``).

``Runtime.infer(texts, images)`` takes a batch of encoded texts and their pictures and returns the
task's decoded output: for NER each word's CRF tag and confidence (``NEROutput``), for RE each
example's relation probabilities. The pipeline (``engine.pipeline``) turns those into answers,
whichever runtime computed them.

- ``OnnxRuntime``: the bundle's ONNX graph on ONNX Runtime, CRF decoding in numpy. Torch-free:
  the CPU server. (CUDA too, where onnxruntime-gpu is installed: ``IMM_PROVIDERS``.)
- ``engine.runtimes.pytorch.TorchRuntime``: the same model rebuilt in PyTorch from the bundle's own
  weights, fp16 CUDA graphs, CRF decoding and JPEG decoding on the GPU. Imported only when chosen.

``IMM_RUNTIME=auto`` picks PyTorch when it is installed and sees a CUDA device, else ONNX Runtime;
the check never imports torch on a machine without an NVIDIA driver.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from engine.runtimes.base import ModelPicture, Runtime, UndecodedJpeg, jpeg_header
from engine.runtimes.onnx import CPU, CUDA, OnnxRuntime, ProviderError, select_providers
from engine.settings import available_cores
from export.bundle import Bundle, session_options
from export.outputs import NEROutput
from model.preprocessing import Preprocessor

if TYPE_CHECKING:
    from engine.settings import Settings

__all__ = [
    "CPU",
    "CUDA",
    "UndecodedJpeg",
    "NEROutput",
    "OnnxRuntime",
    "ModelPicture",
    "ProviderError",
    "Runtime",
    "create_runtime",
    "inference_workers",
    "intra_op_threads",
    "jpeg_header",
    "cpu_matrix_features",
    "resolve_runtime",
    "runtime_choice",
    "select_providers",
]

#: The CPU features that decide how fast int8 and bf16 matrix products run (``/proc/cpuinfo``'s
#: flags), strongest first: AMX tiles, VNNI dot products (AVX-512 or AVX), AVX-512 bf16, AVX2.
MATRIX_FEATURES = ("amx_int8", "amx_bf16", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512f", "avx2")
CPUINFO = Path("/proc/cpuinfo")


# --- choosing and building a runtime ---------------------------------------------------------------


def _nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def cpu_matrix_features(cpuinfo: Path | None = None) -> list[str]:
    """Which of ``MATRIX_FEATURES`` this CPU has (none known where ``/proc/cpuinfo`` is missing)."""
    return list(_matrix_features(cpuinfo or CPUINFO))


@functools.cache
def _matrix_features(cpuinfo: Path) -> tuple[str, ...]:
    """``cpu_matrix_features``, the file read once per process (every model's loading asks)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return ()
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return tuple(feature for feature in MATRIX_FEATURES if feature in flags)


def resolve_runtime(setting: str) -> str:
    """``onnx`` or ``torch`` for ``IMM_RUNTIME`` (``auto``: torch when it is installed and sees a GPU,
    else ONNX Runtime with the bundle's int8 graph: ``runtime_choice`` says why).

    ``auto`` imports torch only where an NVIDIA driver is present, so a CPU server stays torch-free
    even when torch happens to be installed beside it.
    """
    if setting != "auto":
        return setting
    if importlib.util.find_spec("torch") is None or not _nvidia_driver_present():
        return "onnx"
    import torch

    return "torch" if torch.cuda.is_available() else "onnx"


def runtime_choice(setting: str) -> tuple[str, str]:
    """``resolve_runtime``'s answer and why, for the start-up log. On a CPU, ONNX Runtime with the
    bundle's int8 graph is the fastest runtime measured on every CPU tried (docs/benchmarks.md: on
    AVX2 alone OpenVINO was slower in fp32 and int8; on a Xeon with AMX, issue 32's trial, its bf16
    was about 1.35x faster at batch 16 and no faster at batch 1: not yet worth a second runtime)."""
    runtime = resolve_runtime(setting)
    if setting != "auto":
        return runtime, f"IMM_RUNTIME={setting}"
    if runtime == "torch":
        return runtime, "auto: PyTorch sees a CUDA device"
    features = ", ".join(cpu_matrix_features()) or "none known"
    return (
        runtime,
        f"auto: no GPU for PyTorch; ONNX Runtime int8 measured fastest on CPUs (this one: {features})",
    )


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
                "IMM_RUNTIME=torch needs PyTorch: install the gpu extra (pip install 'implicit-modality-mining[gpu]')"
            )
        from engine.runtimes.pytorch import TorchRuntime

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
