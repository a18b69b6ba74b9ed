"""Ensemble teachers and their soft targets, for distilling several seeds into one student.

An ensemble of N checkpoints of the same task (the shipped recipe trained with different seeds)
labels every example softly:

- NER: each word's CRF marginals P(y_i = t | x) (forward-backward, ``CRF.marginals``), averaged
  over the teachers: a (words, tags) matrix per example;
- RE: the teachers' softmax probabilities over the relations, averaged: a (relations,) vector.

``SoftTargets`` holds them with what they were computed from (task, labels, teachers, data files
and a hash of every example's text) and is saved with safetensors: the probabilities of all
examples concatenated, each example's word count (NER), each example's hash, and the teacher's
confidence per example (NER: the mean over words of the largest marginal; RE: the largest
probability), which weights an unlabelled example. ``model.train --soft-targets`` refuses a file
whose examples are not its training examples (``SoftTargets.check_examples``).

The ensemble's own dev scores come from the same pass (``ensemble_predictions``): NER decodes
each word's argmax of the mean marginals, and Viterbi over the mean emissions with the mean CRF
scores; RE takes the argmax of the mean probabilities. ``python -m model.distill`` is the command.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from model.checkpoint import load_checkpoint, read_json
from model.crf import CRF
from model.data import NERExample, REExample, read_mnre
from model.data.dataset import Example
from model.data.images import ImageStore
from model.evaluate import _batches, _full_length
from model.modeling import IMMPreTrainedModel
from model.preprocessing import Preprocessor
from model.tasks import task_spec

__all__ = [
    "DistillationError",
    "EnsemblePredictions",
    "SoftTargets",
    "Teacher",
    "ensemble_predictions",
    "example_hashes",
    "load_teachers",
    "mnre_sentences",
    "read_data",
]

FILE_FORMAT = "imm-soft-targets"
FILE_VERSION = "1"


class DistillationError(ValueError):
    """Teachers that cannot form an ensemble, or soft targets that do not fit the data they are used with."""


# --- what the targets were computed from ---------------------------------------------------------


def example_text(example: Example) -> list[Any]:
    """What identifies an example's input: its words, and for RE the marked pair (one sentence has several)."""
    if isinstance(example, REExample):
        return [list(example.words), list(example.head), list(example.tail)]
    return [list(example.words)]


def example_hashes(examples: Sequence[Example]) -> torch.Tensor:
    """One int64 per example: the first 8 bytes of the SHA-256 of its text (``example_text``)."""
    values = []
    for example in examples:
        digest = hashlib.sha256(
            json.dumps(example_text(example), ensure_ascii=False).encode("utf-8")
        ).digest()
        values.append(int.from_bytes(digest[:8], "little", signed=True))
    return torch.tensor(values, dtype=torch.int64)


def hashes_digest(hashes: torch.Tensor) -> str:
    """One hex digest of all the examples' hashes, in order (the file's summary of its data)."""
    return hashlib.sha256(hashes.numpy().tobytes()).hexdigest()


#: How ``python -m model.distill --data`` files are read: the task's labelled files, or the distinct
#: sentences of MNRE files as unlabelled NER text.
DATA_FORMATS = ("task", "mnre-sentences")


def read_data(task: str, files: Sequence[str | Path], data_format: str = "task") -> list[Example]:
    """The examples of ``files`` in order, read as ``data_format`` says (``DATA_FORMATS``)."""
    if data_format not in DATA_FORMATS:
        raise DistillationError(f"unknown data format {data_format!r} (one of {', '.join(DATA_FORMATS)})")
    if data_format == "mnre-sentences" and task != "ner":
        raise DistillationError("the mnre-sentences format gives unlabelled NER text: it needs task ner")
    examples: list[Example] = []
    for path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        part = mnre_sentences(path) if data_format == "mnre-sentences" else task_spec(task).read(Path(path))
        if not part:
            raise DistillationError(f"{path} holds no examples")
        examples.extend(part)
    return examples


def mnre_sentences(path: str | Path) -> list[NERExample]:
    """The distinct sentences of an MNRE file, once each in file order, as NER examples without gold
    tags (``tags`` empty): unlabelled text for NER distillation."""
    seen: set[tuple[str, ...]] = set()
    sentences = []
    for example in read_mnre(path):
        if example.words not in seen:
            seen.add(example.words)
            sentences.append(NERExample(words=example.words, tags=(), image_id=example.image_id))
    return sentences


# --- the file ----------------------------------------------------------------------------------


@dataclass
class SoftTargets:
    """The ensemble's soft targets for a list of examples, in the examples' order.

    ``probabilities``: NER (total words, tags), the examples' word rows one after another, with
    ``word_counts`` (examples,) saying how many rows each has; RE (examples, relations).
    """

    task: str
    labels: list[str]
    teachers: list[dict[str, Any]]
    data_files: list[str]
    hashes: torch.Tensor  # (examples,) int64, ``example_hashes``
    probabilities: torch.Tensor
    confidence: torch.Tensor  # (examples,) float32
    word_counts: torch.Tensor | None = None  # NER only
    labelled: bool = True  # False: targets for unlabelled text (no gold labels)
    data_format: str = "task"  # how the data files were read (``read_data``)
    dev: dict[str, Any] = field(default_factory=dict)  # the ensemble's dev scores, when measured
    _offsets: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def digest(self) -> str:
        return hashes_digest(self.hashes)

    def example(self, number: int) -> torch.Tensor:
        """Example ``number``'s targets: (words, tags) for NER, (relations,) for RE."""
        if self.word_counts is None:
            return self.probabilities[number]
        if self._offsets is None:
            self._offsets = torch.cumsum(self.word_counts, 0) - self.word_counts
        start = int(self._offsets[number])
        return self.probabilities[start : start + int(self.word_counts[number])]

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        """What a student's training args record about its teacher (the model card reads it)."""
        return {
            "soft_targets": None if path is None else str(path),
            "task": self.task,
            "teachers": self.teachers,
            "data_files": self.data_files,
            "examples": len(self),
            "examples_sha256": self.digest,
            "labelled": self.labelled,
            "data_format": self.data_format,
            "mean_confidence": float(self.confidence.mean()) if len(self) else None,
            "ensemble_dev": self.dev,
        }

    def save(self, path: str | Path) -> None:
        tensors = {
            "hashes": self.hashes.contiguous(),
            "probabilities": self.probabilities.float().contiguous(),
            "confidence": self.confidence.float().contiguous(),
        }
        if self.word_counts is not None:
            tensors["word_counts"] = self.word_counts.to(torch.int64).contiguous()
        metadata = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "task": self.task,
            "labels": json.dumps(self.labels),
            "teachers": json.dumps(self.teachers),
            "data_files": json.dumps(self.data_files),
            "examples": str(len(self)),
            "examples_sha256": self.digest,
            "labelled": json.dumps(self.labelled),
            "data_format": self.data_format,
            "dev": json.dumps(self.dev),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        staging = Path(path).with_name(f".{Path(path).name}.tmp")
        save_file(tensors, str(staging), metadata=metadata)
        staging.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> SoftTargets:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as error:
            raise DistillationError(f"{path} is not a safetensors file: {error}") from None
        if metadata.get("format") != FILE_FORMAT:
            raise DistillationError(f"{path} is not a soft-targets file of python -m model.distill")
        if metadata.get("version") != FILE_VERSION:
            raise DistillationError(
                f"{path}: soft-targets version {metadata.get('version')}, not {FILE_VERSION}"
            )
        targets = cls(
            task=metadata["task"],
            labels=json.loads(metadata["labels"]),
            teachers=json.loads(metadata["teachers"]),
            data_files=json.loads(metadata["data_files"]),
            hashes=tensors["hashes"],
            probabilities=tensors["probabilities"],
            confidence=tensors["confidence"],
            word_counts=tensors.get("word_counts"),
            labelled=json.loads(metadata["labelled"]),
            data_format=metadata.get("data_format", "task"),
            dev=json.loads(metadata["dev"]),
        )
        if targets.digest != metadata["examples_sha256"]:
            raise DistillationError(f"{path} is damaged: its example hashes do not match their digest")
        return targets

    def check_examples(
        self,
        examples: Sequence[Example],
        files: Sequence[str],
        *,
        task: str,
        labels: Sequence[str],
        prefix: bool = False,
    ) -> None:
        """Refuses (``DistillationError``) targets that were not computed for ``examples`` (read from
        ``files``) of ``task`` with ``labels``. With ``prefix`` the examples may be the first ones only
        (``--max-train-examples``)."""
        source = f"computed for {', '.join(self.data_files)} ({len(self)} examples)"
        if self.task != task:
            raise DistillationError(f"the soft targets are for task {self.task}, not {task}")
        if list(self.labels) != list(labels):
            raise DistillationError(
                f"the soft targets' labels {self.labels} are not the model's {list(labels)}"
            )
        if len(examples) > len(self) or (not prefix and len(examples) != len(self)):
            raise DistillationError(
                f"the soft targets were {source}, not for {', '.join(files)} ({len(examples)} examples)"
            )
        differing = (example_hashes(examples) != self.hashes[: len(examples)]).nonzero()
        if len(differing):
            number = int(differing[0])
            raise DistillationError(
                f"the soft targets were {source}, not for {', '.join(files)}: example {number} "
                f"({' '.join(examples[number].words)[:60]!r}) differs"
            )


# --- teachers and their ensemble --------------------------------------------------------------


@dataclass
class Teacher:
    name: str  # the directory as given
    model: IMMPreTrainedModel
    preprocessor: Preprocessor

    def describe(self) -> dict[str, Any]:
        """The teacher as a record: its directory, seed and own dev F1 (as its checkpoint says)."""
        args = read_json(self.name, "training_args.json")
        scores = read_json(self.name, "scores.json")
        return {
            "checkpoint": self.name,
            "seed": args.get("seed"),
            "dev_f1": scores.get("dev_f1", scores.get("f1")),
        }


def load_teachers(directories: Sequence[str | Path], task: str) -> list[Teacher]:
    """The checkpoints in ``directories``, in inference mode; refused unless all are ``task``'s and
    share one label list."""
    if not directories:
        raise DistillationError("no teacher given")
    repeated = sorted({str(d) for d in directories if list(map(str, directories)).count(str(d)) > 1})
    if repeated:
        raise DistillationError(f"teacher {repeated[0]} is given twice: an ensemble's members must differ")
    teachers = []
    for directory in directories:
        model, preprocessor = load_checkpoint(directory)
        if model.config.task != task:
            raise DistillationError(f"teacher {directory} is a {model.config.task} model, not {task}")
        teachers.append(Teacher(str(directory), model.eval(), preprocessor))
    first = teachers[0]
    for teacher in teachers[1:]:
        if list(teacher.model.config.labels) != list(first.model.config.labels):
            raise DistillationError(
                f"teachers {first.name} and {teacher.name} have different label lists "
                f"({first.model.config.labels} and {teacher.model.config.labels}): they cannot be averaged"
            )
    return teachers


@dataclass
class EnsemblePredictions:
    """The ensemble's outputs for a list of examples (``ensemble_predictions``)."""

    targets: list[torch.Tensor]  # per example: NER (words, tags) mean marginals; RE (relations,) mean probs
    confidence: list[float]
    ensemble: dict[str, list]  # decoding name -> label names per example
    teachers: dict[str, list]  # teacher name -> its own label names per example


def _mean_crf(teachers: Sequence[Teacher]) -> CRF:
    """A CRF whose scores are the teachers' mean transition, start and end scores."""
    crfs = [t.model.head.crf for t in teachers]
    return CRF.from_scores(
        torch.stack([c.transitions for c in crfs]).mean(0),
        torch.stack([c.start_transitions for c in crfs]).mean(0),
        torch.stack([c.end_transitions for c in crfs]).mean(0),
    )


def _teacher_batches(
    teachers: Sequence[Teacher], examples, images_dir, batch_size
) -> Iterator[tuple[list, list]]:
    """(examples, one batch of tensors per teacher): each teacher reads the text its own way."""
    streams = [
        _batches(t.preprocessor, examples, ImageStore(images_dir, t.preprocessor.image), batch_size)
        for t in teachers
    ]
    for parts in zip(*streams, strict=True):
        chunk = parts[0][0]
        yield (
            chunk,
            [{name: torch.from_numpy(array) for name, array in arrays.items()} for _, arrays in parts],
        )


def _tag_names(labels: Sequence[str], tags: torch.Tensor, lengths: torch.Tensor) -> list[list[str]]:
    return [
        [labels[t] for t in row[:length]] for row, length in zip(tags.tolist(), lengths.tolist(), strict=True)
    ]


@torch.inference_mode()
def ensemble_predictions(
    teachers: Sequence[Teacher],
    examples: Sequence[Example],
    *,
    images: str | None = None,
    batch_size: int = 64,
    decode: bool = False,
    description: str = "teachers",
) -> EnsemblePredictions:
    """Runs every teacher over ``examples`` and averages them (see the module's docstring).

    With ``decode``, also the label predictions of the ensemble and of each teacher (for scoring).
    A word that some teacher cut off (sequence limit) gets no target; decoded, it is ``O``.
    Batches are made of examples of similar length (less padding); results come in ``examples``' order.
    """
    from tqdm import tqdm

    order = sorted(range(len(examples)), key=lambda number: len(examples[number].words))
    examples = [examples[number] for number in order]

    task = teachers[0].model.config.task
    labels = list(teachers[0].model.config.labels)
    per_word = task_spec(task).labels_per_word
    mean_crf = _mean_crf(teachers) if per_word else None
    result = EnsemblePredictions([], [], {}, {t.name: [] for t in teachers})
    result.ensemble = (
        {"marginal_argmax": [], "mean_emissions_viterbi": []} if per_word else {"mean_probabilities": []}
    )
    batches = _teacher_batches(teachers, examples, images, batch_size)
    total = -(-len(examples) // batch_size)
    for chunk, inputs in tqdm(batches, total=total, unit="batch", desc=description, disable=None):
        outputs = [t.model(**batch).logits.float() for t, batch in zip(teachers, inputs, strict=True)]
        if per_word:
            masks = [batch["word_mask"].bool() for batch in inputs]
            width = min(output.shape[1] for output in outputs)
            lengths = torch.stack([m.sum(1) for m in masks]).min(0).values
            mask = torch.arange(width)[None, :] < lengths[:, None]
            marginals = torch.stack(
                [t.model.head.crf.marginals(o, m) for t, o, m in zip(teachers, outputs, masks, strict=True)]
            )[:, :, :width].mean(0) * mask.unsqueeze(2)
            for row, length in enumerate(lengths.tolist()):
                result.targets.append(marginals[row, :length].clone())
                result.confidence.append(
                    float(marginals[row, :length].max(-1).values.mean()) if length else 0.0
                )
            if decode:
                argmax = _tag_names(labels, marginals.argmax(-1), lengths)
                emissions = torch.stack([o[:, :width] for o in outputs]).mean(0)
                viterbi = _tag_names(labels, mean_crf.viterbi(emissions, mask), lengths)
                result.ensemble["marginal_argmax"] += _full_length(task, argmax, chunk)
                result.ensemble["mean_emissions_viterbi"] += _full_length(task, viterbi, chunk)
                for teacher, output, teacher_mask in zip(teachers, outputs, masks, strict=True):
                    tags = _tag_names(
                        labels, teacher.model.head.crf.viterbi(output, teacher_mask), teacher_mask.sum(1)
                    )
                    result.teachers[teacher.name] += _full_length(task, tags, chunk)
        else:
            probabilities = torch.stack([o.softmax(-1) for o in outputs]).mean(0)
            result.targets += list(probabilities.clone())
            result.confidence += probabilities.max(-1).values.tolist()
            if decode:
                result.ensemble["mean_probabilities"] += [
                    labels[i] for i in probabilities.argmax(-1).tolist()
                ]
                for teacher, output in zip(teachers, outputs, strict=True):
                    result.teachers[teacher.name] += [labels[i] for i in output.argmax(-1).tolist()]
    return _in_order(result, order)


def _in_order(result: EnsemblePredictions, order: list[int]) -> EnsemblePredictions:
    """``result``, computed for the examples in ``order``, in the examples' own order."""

    def restore(values: list) -> list:
        restored: list = [None] * len(values)
        for position, number in enumerate(order):
            restored[number] = values[position]
        return restored

    return EnsemblePredictions(
        targets=restore(result.targets),
        confidence=restore(result.confidence),
        ensemble={name: restore(values) for name, values in result.ensemble.items() if values},
        teachers={name: restore(values) for name, values in result.teachers.items() if values},
    )


def soft_targets(
    teachers: Sequence[Teacher],
    examples: Sequence[Example],
    data_files: Sequence[str],
    predictions: EnsemblePredictions,
    *,
    data_format: str = "task",
    dev: dict[str, Any] | None = None,
) -> SoftTargets:
    """The ``SoftTargets`` of ``examples`` from the ensemble's ``predictions`` of them."""
    config = teachers[0].model.config
    per_word = task_spec(config.task).labels_per_word
    if per_word:
        probabilities = (
            torch.cat(predictions.targets) if predictions.targets else torch.zeros(0, len(config.labels))
        )
        word_counts = torch.tensor([len(t) for t in predictions.targets], dtype=torch.int64)
    else:
        probabilities = torch.stack(predictions.targets)
        word_counts = None
    return SoftTargets(
        task=config.task,
        labels=list(config.labels),
        teachers=[t.describe() for t in teachers],
        data_files=[str(f) for f in data_files],
        hashes=example_hashes(examples),
        probabilities=probabilities,
        confidence=torch.tensor(predictions.confidence, dtype=torch.float32),
        word_counts=word_counts,
        labelled=data_format == "task",
        data_format=data_format,
        dev=dev or {},
    )


def headline(scores: dict[str, Any]) -> dict[str, Any]:
    """The micro scores and the per-type (per-relation) F1s of a scorer's result."""
    per = scores.get("per_type", scores.get("per_relation", {}))
    return {
        "precision": scores["precision"],
        "recall": scores["recall"],
        "f1": scores["f1"],
        "per_type_f1": {name: row["f1"] for name, row in per.items()},
    }
