"""A Triton Inference Server model repository entry for a bundle (torch-free: reads the manifest).

Layout, one model per bundle, next to any other models already in the repository::

    REPO/<name>/config.pbtxt       platform onnxruntime_onnx, whole batches from the client
    REPO/<name>/1/model.onnx       the bundle's graph
    REPO/<name>/manifest.json      for clients: labels, CRF scores, preprocessing constants
    REPO/<name>/tokenizer.json     for clients: the tokenizer

Triton runs the graph only. Tokenisation, image preprocessing and CRF decoding stay on the
client (the same torch-free code as the server: ``model.preprocessing``, ``model.decoding``).
See docs/export.md for serving it on Triton or KServe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from export.bundle import MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE, replace_directory

__all__ = [
    "CONFIG_FILE",
    "TritonRepositoryError",
    "check_repository_target",
    "config_pbtxt",
    "write_triton_model",
]

CONFIG_FILE = "config.pbtxt"
_TRITON_TYPES = {
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bool": "TYPE_BOOL",
}


class TritonRepositoryError(ValueError):
    """The Triton repository target cannot take the model."""


def check_repository_target(repository: Path, name: str) -> None:
    """Refuses, before any work, a repository path that is a file or a model directory we did not write."""
    if repository.exists() and not repository.is_dir():
        raise TritonRepositoryError(f"--triton {repository} exists and is not a directory")
    target = repository / name
    if target.exists():
        if not target.is_dir():
            raise TritonRepositoryError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not (target / CONFIG_FILE).is_file():
            raise TritonRepositoryError(f"{target} exists and is not a Triton model; refusing to replace it")


def _dims(shape: list[Any]) -> list[int]:
    """The full shape, batch axis included (max_batch_size 0): named (dynamic) axes become -1."""
    return [size if isinstance(size, int) and size > 0 else -1 for size in shape]


def _tensor_entry(item: dict[str, Any]) -> str:
    dtype = item["dtype"]
    if dtype not in _TRITON_TYPES:
        raise TritonRepositoryError(f"no Triton type for {item['name']}'s dtype {dtype}")
    dims = _dims(item["shape"])
    lines = [
        f'    name: "{item["name"]}"',
        f"    data_type: {_TRITON_TYPES[dtype]}",
        f"    dims: [ {', '.join(str(d) for d in dims)} ]",
    ]
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_pbtxt(manifest: dict[str, Any], name: str) -> str:
    """The model configuration: ONNX Runtime backend, the bundle's inputs and outputs, no server batching.

    ``max_batch_size: 0``: Triton's batcher needs every input to share the batch axis, but
    ``pixel_values`` has one row per picture (N <= batch), so clients send whole batches,
    collated by ``model.preprocessing.collate``.

    int8 bundles are pinned to CPU instances (dynamic quantisation is a CPU technique); fp16 to
    GPUs; fp32 lets Triton choose (GPU where there is one).
    """
    inputs = ",\n".join(_tensor_entry(item) for item in manifest["inputs"])
    outputs = ",\n".join(_tensor_entry(item) for item in manifest["outputs"])
    kind = {"int8": "KIND_CPU", "int8-weight-only": "KIND_CPU", "fp16": "KIND_GPU"}.get(manifest["precision"])
    parts = [
        f"# {manifest['task'].upper()} model exported by `python -m export` ({manifest['precision']}, opset {manifest['opset']}).",
        "# Labels, CRF scores and preprocessing constants: manifest.json next to this file.",
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        "# Whole batches from the client (pixel_values holds only the batch's pictures).",
        "max_batch_size: 0",
        f"input [\n{inputs}\n]",
        f"output [\n{outputs}\n]",
    ]
    if kind:
        parts.append(f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]")
    return "\n".join(parts) + "\n"


def write_triton_model(bundle_dir: Path, repository: Path, name: str) -> Path:
    """Writes (or replaces) ``repository/name`` from the bundle in ``bundle_dir``; returns that directory."""
    check_repository_target(repository, name)
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        (staging / "1").mkdir()
        shutil.copyfile(bundle_dir / MODEL_FILE, staging / "1" / MODEL_FILE)
        for extra in (MANIFEST_FILE, TOKENIZER_FILE):
            shutil.copyfile(bundle_dir / extra, staging / extra)
        (staging / CONFIG_FILE).write_text(config_pbtxt(manifest, name), encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes it private; Triton may run as another user
        target = repository / name
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
