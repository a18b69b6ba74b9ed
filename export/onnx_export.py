"""Checkpoint to ONNX serving bundle: export, convert the precision, check parity, write atomically.

The graph holds what the server runs per request: patch projection, ISA and IA blocks and the
task head. CLIP (a training-time teacher) and the losses stay out, and so does CRF decoding,
which the server does in numpy (``model.decoding``) with the CRF scores from the manifest.

Exporter: the TorchScript exporter (``dynamo=False``). The dynamo exporter (torch 2.13) takes
~25 s on MiniLM and duplicates the shared attention weights (+25 % size). Both match PyTorch to
~1e-6. ONNX Runtime's offline transformer optimizer is not applied: on this graph it made CPU
inference slower (batch 16 with pictures, 1 thread: 273 against 242 ms) and the file larger
(its fused ``Attention`` copies the query, key and value weights the visual stream still reads).
Instead ``export.optimize`` fuses each attention after the projections into ``MultiHeadAttention``
(fp32, int8 and int8-weight-only; the weights stay where they were), and ONNX Runtime's own graph
optimisations run when a session is made.

Every bundle is checked against PyTorch on deterministic sample batches (mixed lengths, mixed
image and text-only rows) before it is accepted: fp32 within ``FP32_TOLERANCE`` (max abs), fp16
within ``FP16_TOLERANCE`` of the output's scale, int8 by how many decoded labels it keeps; and a
model rebuilt from the manifest's ``weights`` table (what the PyTorch runtime serves) must give
the graph's outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from export.bundle import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    MODEL_FILE,
    TOKENIZER_FILE,
    replace_directory,
    session_options,
    write_manifest,
)
from export.checks import ExportError, check_export_arguments, safe_model_name
from export.graph import INPUT_NAMES, OUTPUT_NAMES, NERGraph, REGraph, graph_module, rebuild_model
from export.outputs import decode_tags
from model.checkpoint import SCORES_FILE, load_checkpoint, read_json, resolve_checkpoint, visual_training
from model.config import IMMConfig
from model.modeling import IMMForNER, IMMPreTrainedModel
from model.preprocessing import Preprocessor
from model.tasks import task_spec

__all__ = [
    "DEFAULT_OPSET",
    "FP16_TOLERANCE",
    "FP32_TOLERANCE",
    "INPUT_NAMES",
    "INT8_MIN_AGREEMENT",
    "MAX_OPSET",
    "MIN_OPSET",
    "OUTPUT_NAMES",
    "ExportError",
    "NERGraph",
    "Parity",
    "REGraph",
    "compare",
    "export_bundle",
    "export_onnx",
    "graph_module",
    "rebuild_model",
    "restore_signature",
    "sample_batches",
    "sample_image",
    "sample_vocabulary",
    "checkpoint_from_bundle",
    "visual_stream",
]

_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "word_index": {0: "batch", 1: "words"},
    "word_shape": {0: "batch", 1: "words"},
    "pixel_values": {0: "pictures"},
    "has_image": {0: "batch"},
    "marker_index": {0: "batch"},
    "emissions": {0: "batch", 1: "words"},
    "logits": {0: "batch"},
}

FP32_TOLERANCE = 1e-4  # max abs difference to PyTorch eager
FP16_TOLERANCE = 2e-2  # max abs difference to PyTorch, relative to max(1, max |output|)
INT8_MIN_AGREEMENT = 0.98  # below this share of identical labels, int8 export warns

logger = logging.getLogger("export")


def visual_stream(visual_training: dict[str, Any]) -> bool:
    """Whether a bundle keeps the visual stream: only if the model learned from pictures
    (``model.checkpoint.visual_training``).

    A model trained on text alone has an inert visual path (IA's value projection is still at its
    zero start), so a picture would cost a decode and the visual stream and change nothing.
    """
    return bool(visual_training["trained"])


# --- sample inputs ------------------------------------------------------------------------------


def sample_vocabulary(preprocessor: Preprocessor) -> list[str]:
    """Whole-word alphabetic tokens of the tokenizer, sorted (deterministic across runs)."""
    vocabulary = preprocessor.text.tokenizer.get_vocab()
    words = sorted(word for word in vocabulary if word.isalpha() and word.isascii() and len(word) > 1)
    return words or ["a"]


def sample_batches(
    preprocessor: Preprocessor,
    task: str,
    *,
    batch_sizes: Sequence[int] = (1, 2, 8, 5),
    max_words: int = 24,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Deterministic batches of random vocabulary words, of mixed lengths, images on about half the rows.

    The first batch's rows all have an image and the second's none, so both paths run even at
    batch size 1. Images are smooth gradients plus noise, normalised like real ones.
    """
    rng = np.random.default_rng(seed)
    vocabulary = sample_vocabulary(preprocessor)
    size = preprocessor.config.image_size
    marks_entity_pair = task_spec(task).marks_entity_pair
    batches = []
    for number, batch_size in enumerate(batch_sizes):
        texts, images = [], []
        for _ in range(batch_size):
            words = [
                vocabulary[i] for i in rng.integers(0, len(vocabulary), int(rng.integers(1, max_words + 1)))
            ]
            if marks_entity_pair:
                words = words if len(words) >= 2 else [*words, "x"]
                head = int(rng.integers(0, len(words) - 1))
                tail = int(rng.integers(head + 1, len(words)))
                texts.append(preprocessor.text.encode_relation(words, (head, head + 1), (tail, tail + 1)))
            else:
                texts.append(preprocessor.text.encode(words))
            with_image = {0: True, 1: False}.get(number, bool(rng.random() < 0.5))
            images.append(sample_image(rng, size, preprocessor) if with_image else None)
        batches.append(preprocessor.collate(texts, images))
    return batches


def sample_image(rng: np.random.Generator, size: int, preprocessor: Preprocessor) -> np.ndarray:
    """A smooth colour gradient with noise, normalised like a real picture: pixel_values of one example."""
    y, x = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 1, 3)
    rgb = np.stack([(x + phase[0]) % 1, (y + phase[1]) % 1, ((x + y) / 2 + phase[2]) % 1], axis=-1)
    rgb = np.clip(rgb + rng.normal(0, 0.05, rgb.shape), 0, 1).astype(np.float32)
    config = preprocessor.config
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return np.ascontiguousarray(((rgb - mean) / std).transpose(2, 0, 1))


def graph_feeds(batch: dict[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    """The graph's inputs out of a collated batch (which also holds ``word_mask``)."""
    return {name: batch[name] for name in INPUT_NAMES[task]}


# --- export -------------------------------------------------------------------------------------


def export_onnx(
    model: IMMPreTrainedModel,
    path: str | Path,
    example: dict[str, np.ndarray],
    opset: int,
    visual: bool = True,
) -> None:
    """Traces the model's graph with dynamic batch, sequence and word axes and writes it to ``path``."""
    task = model.config.task
    names = INPUT_NAMES[task]
    args = tuple(torch.from_numpy(example[name]) for name in names)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter announces its deprecation, and the tracer flags the Python
        # ints (layer count, head size) that are fixed by design.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph_module(model, visual),
            args,
            str(path),
            dynamo=False,
            input_names=list(names),
            output_names=list(OUTPUT_NAMES[task]),
            dynamic_axes={name: _DYNAMIC_AXES[name] for name in (*names, *OUTPUT_NAMES[task])},
            opset_version=opset,
            do_constant_folding=True,
        )
    restore_signature(path, task, example)


def restore_signature(path: str | Path, task: str, example: dict[str, np.ndarray]) -> None:
    """Rewrites the graph at ``path`` with every contract input, in contract order, and no Identity weights.

    Run after every tool that rewrites the graph: the tracer and ONNX Runtime's optimizer both
    prune inputs that the configuration does not use.
    """
    graph = onnx.load(str(path))
    _restore_unused_inputs(graph, example, INPUT_NAMES[task])
    _inline_initializer_identities(graph)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def _restore_unused_inputs(
    graph: onnx.ModelProto, example: dict[str, np.ndarray], names: Sequence[str]
) -> None:
    """Puts back inputs the tracer dropped because this configuration ignores them.

    ``marker_index`` is unused with ``re_pooling="cls"``, ``has_image`` without IA in separate
    attention. Every bundle of a task keeps the same signature, so clients need no special case.
    """
    present = {value.name for value in graph.graph.input}
    inputs = []
    for name in names:
        if name in present:
            inputs.append(next(v for v in graph.graph.input if v.name == name))
            continue
        array = example[name]
        axis_names = _DYNAMIC_AXES[name]
        shape = [axis_names.get(axis, size) for axis, size in enumerate(array.shape)]
        element = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        inputs.append(onnx.helper.make_tensor_value_info(name, element, shape))
    del graph.graph.input[:]
    graph.graph.input.extend(inputs)


def _inline_initializer_identities(graph: onnx.ModelProto) -> None:
    """Drops ``Identity(initializer)`` nodes, pointing their consumers at the initializer.

    The exporter routes a weight used twice (the attention that both streams share, or two
    weights that happen to be equal) through Identity nodes; ONNX Runtime's quantizer only
    quantizes a MatMul whose weight is an initializer, so it would leave those in fp32.
    """
    initializers = {tensor.name for tensor in graph.graph.initializer}
    outputs = {value.name for value in graph.graph.output}
    rename = {
        node.output[0]: node.input[0]
        for node in graph.graph.node
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs
    }
    if not rename:
        return
    kept = [
        node for node in graph.graph.node if not (node.op_type == "Identity" and node.output[0] in rename)
    ]
    for node in kept:
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    del graph.graph.node[:]
    graph.graph.node.extend(kept)


def _io_description(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Names, numpy dtypes and shapes (axis names for dynamic axes) of the graph's inputs and outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        return {
            "name": value.name,
            "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name,
            "shape": [axis.dim_param or axis.dim_value for axis in tensor.shape.dim],
        }

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


# --- parity -------------------------------------------------------------------------------------


@dataclass
class Parity:
    """How an ONNX graph's outputs compare to PyTorch's on the sample batches."""

    max_abs: float
    output_scale: float  # max |PyTorch output|
    label_agreement: float  # share of words (NER, after Viterbi) or examples (RE) with the same label
    compared: int  # words or examples compared

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def torch_outputs(
    model: IMMPreTrainedModel, batches: Sequence[dict[str, np.ndarray]], visual: bool = True
) -> list[np.ndarray]:
    wrapper = graph_module(model, visual)
    task = model.config.task
    with torch.inference_mode():
        return [
            wrapper(*(torch.from_numpy(batch[name]) for name in INPUT_NAMES[task])).float().numpy()
            for batch in batches
        ]


def ort_session(path: str | Path, threads: int | None = None):
    """A CPU session for the parity checks, with the options the server uses."""
    import onnxruntime as ort

    options = session_options(intra_op_threads=threads or torch.get_num_threads())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def labels_of(outputs: np.ndarray, batch: dict[str, np.ndarray], crf: dict[str, np.ndarray] | None) -> list:
    """Decoded label ids (``export.outputs``, as served): the CRF's Viterbi tags (NER), the argmax (RE)."""
    if crf is None:
        return outputs.argmax(axis=-1).tolist()
    return decode_tags(outputs, batch["word_mask"], crf, confidence=False).tags


def compare(
    path: Path,
    task: str,
    batches: Sequence[dict[str, np.ndarray]],
    references: Sequence[np.ndarray],
    crf: dict[str, np.ndarray] | None,
) -> Parity:
    session = ort_session(path)
    max_abs, scale, same, total = 0.0, 0.0, 0, 0
    for batch, reference in zip(batches, references):
        (output,) = session.run(list(OUTPUT_NAMES[task]), graph_feeds(batch, task))
        if output.shape != reference.shape:
            raise ExportError(
                f"the ONNX graph's output has shape {output.shape}, PyTorch's {reference.shape}"
            )
        if not np.isfinite(output).all():
            return Parity(float("inf"), float(np.abs(reference).max()), 0.0, 0)
        max_abs = max(max_abs, float(np.abs(output.astype(np.float64) - reference).max()))
        scale = max(scale, float(np.abs(reference).max()))
        for ours, theirs in zip(labels_of(output, batch, crf), labels_of(reference, batch, crf)):
            ours, theirs = np.atleast_1d(ours), np.atleast_1d(theirs)
            same += int((ours == theirs).sum())
            total += len(theirs)
    return Parity(max_abs, scale, same / max(total, 1), total)


# --- the bundle ---------------------------------------------------------------------------------


def export_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    opset: int | None = None,
    triton_dir: str | Path | None = None,
    *,
    name: str | None = None,
    source: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Exports a checkpoint into a bundle at ``out_dir`` (and a Triton model under ``triton_dir``);
    ``source`` names where the checkpoint came from when it is a temporary one (``--from-bundle``).

    Everything is checked before anything is written; the bundle is built in a hidden sibling
    directory and renamed into place, so a failure leaves nothing at ``out_dir``. An existing
    bundle at ``out_dir`` is replaced; any other non-empty directory is refused.
    """
    say = log or (lambda message: logger.info(message))
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    opset = DEFAULT_OPSET if opset is None else opset
    check_export_arguments(checkpoint_dir, out_dir, precision, opset)
    model_name = safe_model_name(name or checkpoint_dir.resolve().name)
    if triton_dir is not None:
        from export.triton import check_repository_target

        check_repository_target(Path(triton_dir), model_name)

    started = time.perf_counter()
    # Resolved once: a training run writing to checkpoint_dir may commit a newer generation meanwhile.
    files = resolve_checkpoint(checkpoint_dir)
    try:
        model, preprocessor = load_checkpoint(files)
        training = visual_training(files)
    except Exception as error:  # noqa: BLE001 - bad config, weights that do not fit it, corrupt files
        raise ExportError(f"cannot load checkpoint {checkpoint_dir}: {_first_line(error)}") from error
    model.eval()
    task = model.config.task
    visual = visual_stream(training)
    if not visual:
        say("the visual path was never trained: the bundle leaves the visual stream out and ignores pictures")
    crf = _crf_arrays(model) if task_spec(task).has_crf else None
    batches = sample_batches(preprocessor, task)
    references = torch_outputs(model, batches, visual)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        with tempfile.TemporaryDirectory(prefix="imm-export-") as work:
            work = Path(work)
            graph, details = _build_graph(
                model, precision, opset, batches, references, crf, work, say, visual
            )
            shutil.move(str(graph), staging / MODEL_FILE)
        shutil.copyfile(files / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        inputs, outputs = _io_description(staging / MODEL_FILE)
        write_manifest(
            staging,
            task=task,
            model_name=model_name,
            labels=model.config.labels,
            preprocessing=model.config.preprocessing,
            precision=precision,
            opset=opset,
            inputs=inputs,
            outputs=outputs,
            scores=read_json(files, SCORES_FILE),
            crf=crf,
            extra={
                **details,
                "visual_stream": visual,
                "visual_training": training,
                "source": {
                    "checkpoint": source or str(checkpoint_dir.resolve()),
                    "backbone": model.config.backbone,
                    "config": model.config.to_dict(),
                },
                "exporter": {"torch": torch.__version__, "onnx": onnx.__version__, **_ort_version()},
            },
        )
        triton_model = None
        if triton_dir is not None:
            from export.triton import write_triton_model

            triton_model = write_triton_model(staging, Path(triton_dir), model_name)
        replace_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(
        f"exported {source or checkpoint_dir} -> {out_dir} ({precision}, {(out_dir / MODEL_FILE).stat().st_size / 1e6:.1f} MB"
        f"{', Triton model ' + str(triton_model) if triton_model else ''}) in {time.perf_counter() - started:.1f} s"
    )
    return out_dir


def _crf_arrays(model: IMMForNER) -> dict[str, np.ndarray]:
    crf = model.head.crf
    return {
        "transitions": crf.transitions.detach().float().numpy().copy(),
        "start_transitions": crf.start_transitions.detach().float().numpy().copy(),
        "end_transitions": crf.end_transitions.detach().float().numpy().copy(),
    }


def _ort_version() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


def _build_graph(
    model: IMMPreTrainedModel,
    precision: str,
    opset: int,
    batches: list[dict[str, np.ndarray]],
    references: list[np.ndarray],
    crf: dict[str, np.ndarray] | None,
    work: Path,
    say: Callable[[str], None],
    visual: bool,
) -> tuple[Path, dict[str, Any]]:
    """The final graph file in ``work`` and what the manifest records about it.

    fp32: the exported graph. int8: integer MatMuls with per-row activation scales; int8-weight-only:
    its weights int8 (``export.quantize``). fp16: converted to fp16 with fp32 inputs and outputs, if
    it stays within ``FP16_TOLERANCE``. Every bundle also gets its ``weights`` table
    (``export.weights``), checked by rebuilding the model from it. An int8 graph is checked by how
    many decoded labels it keeps.
    """
    from export import optimize, quantize
    from export.weights import apply_quantization, find_weights

    task = model.config.task

    def rewrite(what: str, function: Callable[..., Any], source: Path, target: Path, *args: Any) -> Any:
        """One graph tool, then the stable signature back; a failure is an ExportError."""
        try:
            result = function(source, target, *args)
            restore_signature(target, task, batches[2])
            return result
        except Exception as error:  # noqa: BLE001 - third-party graph tools raise anything
            raise ExportError(f"{what} failed: {type(error).__name__}: {_first_line(error)}") from error

    raw = work / "raw.onnx"
    export_onnx(model, raw, batches[2], opset, visual)
    parity = compare(raw, task, batches, references, crf)
    if not parity.max_abs <= FP32_TOLERANCE:
        raise ExportError(
            f"the exported graph does not match PyTorch: max abs difference {parity.max_abs:.3g} "
            f"> {FP32_TOLERANCE:g}"
        )
    state = {key: value.detach().float().numpy() for key, value in model.state_dict().items()}
    weights = find_weights(onnx.load(str(raw)), state)
    details: dict[str, Any] = {}
    final, tolerance = raw, FP32_TOLERANCE
    fused = raw
    if precision != "fp16":  # fp16 is for GPUs, where ONNX Runtime's CUDA provider fuses its own way
        fused = work / "fused.onnx"
        heads = model.config.backbone_config.num_attention_heads
        counts = rewrite("fusion", optimize.fuse_graph, raw, fused, heads)
        details["optimization"] = optimize.OPTIMIZATION | {"fused": counts}
    if precision == "fp32":
        final = fused
        parity = compare(final, task, batches, references, crf)
        if not parity.max_abs <= FP32_TOLERANCE:
            raise ExportError(
                f"the fused graph does not match PyTorch: max abs difference {parity.max_abs:.3g} "
                f"> {FP32_TOLERANCE:g}"
            )
        details["parity"] = parity.to_dict() | {"tolerance": FP32_TOLERANCE}
    elif precision == "int8":
        final = work / "int8.onnx"
        weights = apply_quantization(
            weights, rewrite("int8 quantization", quantize.quantize_per_row, fused, final)
        )
        twin = work / "int8-float-activations.onnx"
        quantize.float_activation_twin(raw, twin)
        details |= _int8_parity(final, task, batches, references, crf, say)
        details["quantization"] = quantize.PER_ROW_SETTINGS
    elif precision == "int8-weight-only":
        final = work / "int8.onnx"
        weights = apply_quantization(
            weights, rewrite("int8 quantization", quantize.quantize_weight_only, fused, final)
        )
        details |= _int8_parity(final, task, batches, references, crf, say)
        details["quantization"] = quantize.WEIGHT_ONLY_SETTINGS
    else:
        final = work / "fp16.onnx"
        rewrite("fp16 conversion", quantize.convert_fp16, raw, final)
        half_parity = compare(final, task, batches, references, crf)
        tolerance = FP16_TOLERANCE * max(1.0, half_parity.output_scale)
        if not half_parity.max_abs <= tolerance:
            raise ExportError(
                f"the fp16 graph does not match PyTorch: max abs difference {half_parity.max_abs:.3g} > {tolerance:.3g}"
            )
        details["parity"] = half_parity.to_dict() | {"tolerance": tolerance}
    details["weights"] = weights
    # A per-row int8 graph's activations are integers: its fp32-activation twin has the same weights.
    _check_weights(model, twin if precision == "int8" else final, weights, batches, crf, visual, tolerance)
    return final, details


def checkpoint_from_bundle(bundle_dir: str | Path, directory: str | Path) -> Path:
    """Writes a checkpoint into ``directory`` rebuilt from a bundle's own weights (its weights table
    and CRF scores), tokenizer, configuration, dev scores and visual-training record: a bundle
    re-exported from it (``python -m export --from-bundle``) has the same weights, at another
    precision or in another graph version. An int8 bundle gives its dequantised weights."""
    from export.bundle import load_bundle
    from model.checkpoint import write_checkpoint
    from model.preprocessing import load_tokenizer

    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    if "weights" not in manifest or "source" not in manifest:
        raise ExportError(
            f"bundle {bundle.directory} has no weights table (exported before it existed): re-export it "
            "from its checkpoint"
        )
    config = IMMConfig.from_dict(manifest["source"]["config"])
    model = rebuild_model(config, bundle.model_path, manifest["weights"])
    if bundle.crf is not None:  # outside the graph: in the manifest
        with torch.no_grad():
            for key, value in bundle.crf.items():
                getattr(model.head.crf, key).copy_(torch.from_numpy(value))
    preprocessor = Preprocessor(bundle.preprocessing, load_tokenizer(bundle.tokenizer_path))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_checkpoint(
        directory,
        model,
        preprocessor,
        training_args={"from_bundle": str(bundle.directory), "bundle": bundle.name},
        scores=manifest.get("scores", {}),
        visual_training=manifest["visual_training"],
    )
    return directory


def _check_weights(
    model: IMMPreTrainedModel,
    graph: Path,
    weights: dict[str, dict[str, Any]],
    batches: Sequence[dict[str, np.ndarray]],
    crf: dict[str, np.ndarray] | None,
    visual: bool,
    tolerance: float,
) -> None:
    """A model rebuilt from the ``weights`` table alone must give the graph's outputs: the table is
    what the PyTorch runtime serves, so a parameter it misses or misreads fails the export here."""
    rebuilt = rebuild_model(model.config, graph, weights)
    task = model.config.task
    parity = compare(graph, task, batches, torch_outputs(rebuilt, batches, visual), crf)
    if not parity.max_abs <= tolerance:
        missing = sorted(set(model.state_dict()) - set(weights))
        raise ExportError(
            f"the bundle's weights table does not rebuild the model (max abs difference {parity.max_abs:.3g} "
            f"> {tolerance:.3g}; parameters not found in the graph: {', '.join(missing[:8]) or 'none'})"
        )


def _int8_parity(
    graph: Path,
    task: str,
    batches: Sequence[dict[str, np.ndarray]],
    references: Sequence[np.ndarray],
    crf: dict[str, np.ndarray] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """An int8 graph against PyTorch on the sample batches: finite, and how many labels it keeps."""
    parity = compare(graph, task, batches, references, crf)
    if not np.isfinite(parity.max_abs):
        raise ExportError("the int8 graph produces non-finite outputs")
    if parity.label_agreement < INT8_MIN_AGREEMENT:
        say(
            f"warning: int8 keeps {parity.label_agreement:.1%} of the labels on the sample inputs "
            f"(< {INT8_MIN_AGREEMENT:.0%}); check its dev score before serving it"
        )
    return {"parity": parity.to_dict() | {"min_agreement_warning": INT8_MIN_AGREEMENT}}


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
