"""One description per task: what NER and RE each read, predict, score and export.

Code that differs by task asks the task's ``TaskSpec`` (``task_spec(config.task)``) what to do
instead of comparing task names or keeping tables of its own: a new task is one ``TaskSpec``
(``register_task``) plus its model and pipeline classes (docs/architecture.md, "Adding a task").
Torch-free (every layer imports it, the CPU server included): the classes each layer needs are named
as ``"module:Class"`` and imported only by that layer, when it asks (``TaskSpec.load``), so that
this module imports nothing above it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.data import MNRE_RELATIONS, NER_LABELS, NERExample, REExample, read_mnre, read_twitter_conll

__all__ = ["NER", "RE", "TASKS", "TaskSpec", "register_task", "task_spec"]


@dataclass(frozen=True)
class TaskSpec:
    """What one task is, for every layer that handles it.

    ``labels`` is the default label set in id order (a checkpoint's config carries its own copy);
    ``read`` reads a dataset file into examples; ``score`` computes the paper's scores of
    predicted label names against the examples' gold ones. ``graph_inputs`` and ``graph_outputs``
    are the exported graph's signature, in the order the graph takes and gives them.
    """

    name: str
    description: str
    labels: tuple[str, ...]
    read: Callable[[str | Path], list[Any]]
    score: Callable[[Sequence[Any], list[Any]], dict[str, Any]]
    # A CRF over the word tags: Viterbi decoding, and its transition scores in the bundle.
    has_crf: bool
    # One label per word (a tag sequence) rather than one per example.
    labels_per_word: bool
    # The text marks a head and a tail entity (the tokenizer gets the entity markers).
    marks_entity_pair: bool
    # May embed each word's casing class beside its state (``IMMConfig.word_shape_size``).
    uses_word_shapes: bool
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]
    # The classes of the layers above, as "module:Class": the PyTorch model (model layer, torch),
    # the wrapper traced into the ONNX graph (export), the serving pipeline (engine: prepares a
    # request, runs a batch, makes the answer) and the answer type (engine.answers).
    model_class: str
    graph_wrapper: str
    pipeline: str
    answer: str
    # The field of the engine's settings naming the task's bundle (environment: IMM_<FIELD>), and
    # the HTTP path that serves it.
    bundle_setting: str
    route: str

    def load(self, part: str) -> Any:
        """The class ``part`` names (``"model_class"``, ``"graph_wrapper"``, ``"pipeline"``, ``"answer"``),
        imported now: only the layer that uses it pays for (and may import) its module."""
        module, _, name = getattr(self, part).partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def env_name(self) -> str:
        """The environment variable of the task's bundle, e.g. ``IMM_NER_BUNDLE``."""
        return f"IMM_{self.bundle_setting.upper()}"


# The scorers import seqeval through model.metrics only when called: it is a training dependency,
# and the server, which imports this module, does not have it.
def _entity_scores(examples: Sequence[NERExample], predictions: list[list[str]]) -> dict[str, Any]:
    from model.metrics import ner_scores

    return ner_scores([list(example.tags) for example in examples], predictions)


def _relation_scores(examples: Sequence[REExample], predictions: list[str]) -> dict[str, Any]:
    from model.metrics import re_scores

    return re_scores([example.relation for example in examples], predictions)


NER = TaskSpec(
    name="ner",
    description="named entities: a BIO tag per word (PER, LOC, ORG, MISC), Twitter-2015/2017",
    labels=NER_LABELS,
    read=read_twitter_conll,
    score=_entity_scores,
    has_crf=True,
    labels_per_word=True,
    marks_entity_pair=False,
    uses_word_shapes=True,
    graph_inputs=("input_ids", "attention_mask", "word_index", "word_shape", "pixel_values", "has_image"),
    graph_outputs=("emissions",),
    model_class="model.modeling:IMMForNER",
    graph_wrapper="export.graph:NERGraph",
    pipeline="engine.pipeline:NERPipeline",
    answer="engine.answers:NERResponse",
    bundle_setting="ner_bundle",
    route="/ner",
)

RE = TaskSpec(
    name="re",
    description="the relation between a marked head and tail entity (MNRE's relations, None included)",
    labels=MNRE_RELATIONS,
    read=read_mnre,
    score=_relation_scores,
    has_crf=False,
    labels_per_word=False,
    marks_entity_pair=True,
    uses_word_shapes=False,
    graph_inputs=("input_ids", "attention_mask", "pixel_values", "has_image", "marker_index"),
    graph_outputs=("logits",),
    model_class="model.modeling:IMMForRE",
    graph_wrapper="export.graph:REGraph",
    pipeline="engine.pipeline:REPipeline",
    answer="engine.answers:REResponse",
    bundle_setting="re_bundle",
    route="/re",
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (NER, RE)}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Adds ``spec`` to ``TASKS`` (every layer then knows it); ValueError if its name is taken."""
    if spec.name in TASKS:
        raise ValueError(f"a task called {spec.name!r} is already registered")
    TASKS[spec.name] = spec
    return spec


def task_spec(name: str) -> TaskSpec:
    """The description of the task called ``name``; ValueError naming the known tasks otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(task) for task in TASKS)
        raise ValueError(f"unknown task {name!r}: the tasks are {known}") from None
