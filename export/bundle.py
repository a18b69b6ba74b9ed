"""Serving bundles: writing and verifying ``manifest.json`` (numpy, json and hashlib only).

The server imports this module and never PyTorch, so nothing here may import torch, onnx or
onnxruntime. A bundle is a flat directory::

    model.onnx       the graph (patch projection, ISA, IA, head); CLIP and the losses are not in it
    tokenizer.json   the checkpoint's tokenizer (entity markers included for RE)
    manifest.json    task, labels, CRF scores, preprocessing constants, precision, opset, graph
                     inputs and outputs, dev scores, parity measured at export, and the sha256 of
                     every other file

``load_bundle`` refuses a bundle whose files do not match their recorded sha256, whose manifest
was edited after export (the manifest carries a checksum of its own canonical JSON), or whose
manifest is incomplete, with one clear :class:`BundleError` message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from model.config import PreprocessingConfig
from model.tasks import TASKS, task_spec

__all__ = [
    "CRF_KEYS",
    "DEFAULT_OPSET",
    "FORMAT_VERSION",
    "MAX_OPSET",
    "MIN_OPSET",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "PRECISIONS",
    "TOKENIZER_FILE",
    "Bundle",
    "BundleError",
    "load_bundle",
    "manifest_checksum",
    "read_manifest",
    "session_options",
    "sha256_file",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"  # the same name as model.preprocessing.TOKENIZER_FILE
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8", "int8-weight-only")
# 14: the first opset with the ops scaled_dot_product_attention exports to; 20: the TorchScript
# exporter's last. 17 is the first with a LayerNormalization op (older ones get it decomposed).
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 14, 20, 17
CRF_KEYS = ("transitions", "start_transitions", "end_transitions")
_CHECKSUM_KEY = "manifest_sha256"
_REQUIRED = (
    "format_version",
    "task",
    "model_name",
    "labels",
    "preprocessing",
    "precision",
    "inputs",
    "outputs",
)


class BundleError(ValueError):
    """A directory that is not a usable serving bundle (missing file, tampered file, bad manifest)."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum: any later edit changes it."""
    body = {key: value for key, value in manifest.items() if key != _CHECKSUM_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _bundle_files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` except the manifest, as sorted POSIX relative paths."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path.relative_to(directory).as_posix() != MANIFEST_FILE
    )


def write_manifest(
    directory: str | Path,
    *,
    task: str,
    model_name: str,
    labels: Sequence[str],
    preprocessing: PreprocessingConfig | Mapping[str, Any],
    precision: str,
    opset: int,
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Any] | None = None,
    crf: Mapping[str, np.ndarray] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Hashes every file already in ``directory`` and writes ``manifest.json`` next to them.

    Call it last, once the bundle's other files are final. ``crf`` (NER only) holds pytorch-crf's
    ``transitions``, ``start_transitions`` and ``end_transitions``; float32 values survive JSON
    exactly, so numpy decoding on the server equals the checkpoint's. ``extra`` adds free-form
    keys (parity, optimisation, source) that the loader keeps but does not interpret.
    """
    directory = Path(directory)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    has_crf = task_spec(task).has_crf
    if has_crf != (crf is not None):
        raise ValueError(f"a {task.upper()} bundle {'needs' if has_crf else 'has no'} CRF scores")
    preprocessing_dict = (
        _jsonable(dataclasses.asdict(preprocessing))
        if isinstance(preprocessing, PreprocessingConfig)
        else _jsonable(dict(preprocessing))
    )
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "task": task,
        "model_name": model_name,
        "labels": list(labels),
        "preprocessing": preprocessing_dict,
        "precision": precision,
        "opset": int(opset),
        "inputs": [_jsonable(dict(item)) for item in inputs],
        "outputs": [_jsonable(dict(item)) for item in outputs],
        "scores": _jsonable(dict(scores or {})),
    }
    if crf is not None:
        manifest["crf"] = {key: np.asarray(crf[key], dtype=np.float32).tolist() for key in CRF_KEYS}
    for key, value in (extra or {}).items():
        if key in manifest or key in ("files", _CHECKSUM_KEY):
            raise ValueError(f"extra manifest key {key!r} would overwrite a reserved one")
        manifest[key] = _jsonable(value)
    manifest["files"] = {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in _bundle_files(directory)
    }
    for required in (MODEL_FILE, TOKENIZER_FILE):
        if required not in manifest["files"]:
            raise ValueError(f"{directory} has no {required} to put in the manifest")
    manifest[_CHECKSUM_KEY] = manifest_checksum(manifest)
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _jsonable(value: Any) -> Any:
    """Tuples to lists, numpy scalars and arrays to Python values, recursively."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class Bundle:
    """A verified bundle: what the server needs to build its session, preprocessing and decoder."""

    directory: Path
    manifest: dict[str, Any]
    task: str
    labels: list[str]
    preprocessing: PreprocessingConfig
    crf: dict[str, np.ndarray] | None  # NER: transitions (T, T), start_transitions (T,), end_transitions (T,)
    model_path: Path
    tokenizer_path: Path
    name: str  # "<model_name>@<first 12 hex digits of model.onnx's sha256>"

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def input_names(self) -> list[str]:
        return [item["name"] for item in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [item["name"] for item in self.manifest["outputs"]]

    @property
    def scores(self) -> dict[str, Any]:
        return self.manifest.get("scores", {})


def read_manifest(path: Path) -> dict[str, Any]:
    """The JSON object of a ``manifest.json``, or ``BundleError`` naming the file (empty, not JSON,
    not an object, unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BundleError(f"{path} cannot be read: {error}") from None
    if not text.strip():
        raise BundleError(f"{path} is empty: re-export the bundle")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} must hold a JSON object")
    return manifest


def load_bundle(directory: str | Path, *, verify: bool = True) -> Bundle:
    """Reads and checks a bundle; ``verify`` (the default) also checks every file's sha256.

    Raises :class:`BundleError` with a message naming the directory and the problem.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle {directory} is not a directory")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{directory} is not a bundle: it has no {MANIFEST_FILE}")
    manifest = read_manifest(manifest_path)
    _check_manifest(manifest, manifest_path)
    files = manifest["files"]
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"bundle {directory} is missing {name}, listed in its manifest")
        if verify:
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise BundleError(
                    f"bundle {directory}: {name} does not match its manifest (sha256 {actual[:12]}..., "
                    f"expected {entry['sha256'][:12]}...): the file was modified or corrupted; re-export it"
                )
    crf = None
    if task_spec(manifest["task"]).has_crf:
        crf = {key: np.asarray(manifest["crf"][key], dtype=np.float32) for key in CRF_KEYS}
    return Bundle(
        directory=directory,
        manifest=manifest,
        task=manifest["task"],
        labels=list(manifest["labels"]),
        preprocessing=PreprocessingConfig.from_dict(manifest["preprocessing"]),
        crf=crf,
        model_path=directory / MODEL_FILE,
        tokenizer_path=directory / TOKENIZER_FILE,
        name=f"{manifest['model_name']}@{files[MODEL_FILE]['sha256'][:12]}",
    )


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Structure and consistency checks; the first problem found is the error."""

    def fail(problem: str) -> BundleError:
        return BundleError(f"{path}: {problem}")

    missing = [key for key in (*_REQUIRED, "files", _CHECKSUM_KEY) if key not in manifest]
    if missing:
        raise fail(f"not a complete bundle manifest (missing {', '.join(missing)})")
    if manifest["format_version"] != FORMAT_VERSION:
        raise fail(
            f"format_version {manifest['format_version']!r} is not supported (this code reads {FORMAT_VERSION})"
        )
    if manifest[_CHECKSUM_KEY] != manifest_checksum(manifest):
        raise fail("the manifest was edited after export (its checksum does not match); re-export the bundle")
    task, labels = manifest["task"], manifest["labels"]
    if task not in TASKS:
        raise fail(f"task must be one of {', '.join(map(repr, TASKS))}, not {task!r}")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise fail("labels must be a non-empty list of strings")
    if manifest["precision"] not in PRECISIONS:
        raise fail(f"precision {manifest['precision']!r} is not one of {PRECISIONS}")
    if not isinstance(manifest["preprocessing"], dict):
        raise fail("preprocessing must be an object")
    for key in ("inputs", "outputs"):
        items = manifest[key]
        if (
            not isinstance(items, list)
            or not items
            or not all(isinstance(i, dict) and "name" in i for i in items)
        ):
            raise fail(f"{key} must be a non-empty list of {{'name': ...}} objects")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise fail("files must map file names to their sha256")
    for name, entry in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or name == MANIFEST_FILE:
            raise fail(f"file name {name!r} is not a plain relative path inside the bundle")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise fail(f"files[{name!r}] has no sha256")
    for required in (MODEL_FILE, TOKENIZER_FILE):
        if required not in files:
            raise fail(f"{required} is not listed in the manifest")
    if TASKS[task].has_crf:
        crf = manifest.get("crf")
        if not isinstance(crf, dict) or any(key not in crf for key in CRF_KEYS):
            raise fail(f"a {task.upper()} bundle needs crf.{', crf.'.join(CRF_KEYS)}")
        tags = len(labels)
        try:
            shapes = {key: np.asarray(crf[key], dtype=np.float32).shape for key in CRF_KEYS}
        except (TypeError, ValueError):
            raise fail("crf scores must be numeric arrays") from None
        expected = {"transitions": (tags, tags), "start_transitions": (tags,), "end_transitions": (tags,)}
        if shapes != expected:
            raise fail(f"crf shapes {shapes} do not fit {tags} labels")


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 1, allow_spinning: bool = False):
    """The ONNX Runtime session options every bundle is run with: the server's, export's parity
    checks' and ``model.evaluate --bundle``'s, so that all three compute the same numbers.

    - QDQ fusions off (``session.disable_quant_qdq``): the weight-only int8 parts of a bundle (every
      weight of ``int8-weight-only``, the patch projection of ``int8``) sit behind lone
      ``DequantizeLinear`` nodes, which ONNX Runtime then folds into fp32 weights once, when the
      session is made, instead of dequantising them at every run (measured: 6x slower at batch 1).
    - Spinning off by default: ONNX Runtime's worker threads busy-wait after each run, which on a
      few shared cores steals the CPU the next request's parsing and image decoding need (measured
      on 2 cores: /ner p50 115 against 200 ms with a picture). Turn it on for a dedicated machine.
    """
    import onnxruntime as ort  # lazily: this module must stay importable without it

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if allow_spinning else "0")
    options.log_severity_level = 3  # errors only: callers report what matters
    return options


def replace_directory(source: Path, target: Path) -> None:
    """Moves the finished directory ``source`` to ``target``, replacing an existing ``target`` by two
    renames (the old one moved aside, then removed): a reader finds the old directory or the new one
    whole, never a mix (bundles, Triton models)."""
    if target.exists():
        retired = target.with_name(f".{target.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(source, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(source, target)
