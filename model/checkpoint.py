"""Checkpoint directories and the model factory.

A checkpoint (the contract with ``model.evaluate``, ``export`` and ``--init-from``) is these files::

    model.safetensors     weights (never pickled)
    config.json           IMMConfig: task, labels, hyper-parameters, preprocessing constants
    tokenizer.json        the tokenizer, entity markers included for RE
    training_args.json    how it was trained
    scores.json           its dev scores
    visual_training.json  whether and how the visual path was trained (see ``visual_training``)

``save_checkpoint`` and ``model.train`` keep them in a generation of the directory, behind one
pointer switched atomically (``model.run_directory``): a reader never sees a half-written or a
mixed checkpoint, and a kill at any moment leaves the previous one whole. Readers take the
directory and find the files with ``resolve_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from model.config import IMMConfig, Task
from model.modeling import CONFIG_FILE, WEIGHTS_FILE, IMMPreTrainedModel, build_task_model
from model.preprocessing import TOKENIZER_FILE, Preprocessor, add_entity_markers, load_tokenizer
from model.run_directory import (
    CHECKPOINT_DIR,
    CheckpointError,
    commit,
    next_generation,
    resolve_checkpoint,
)
from model.tasks import task_spec

__all__ = [
    "CHECKPOINT_FILES",
    "CheckpointError",
    "SCORES_FILE",
    "TRAINING_ARGS_FILE",
    "VISUAL_TRAINING_FILE",
    "create_model",
    "create_model_from_checkpoint",
    "describe_visual_training",
    "has_checkpoint",
    "load_checkpoint",
    "read_json",
    "resolve_checkpoint",
    "save_checkpoint",
    "visual_training",
    "write_checkpoint",
]

TRAINING_ARGS_FILE = "training_args.json"
SCORES_FILE = "scores.json"
VISUAL_TRAINING_FILE = "visual_training.json"
# The files of a checkpoint written by this version (a flat checkpoint of an older one lacks the last).
CHECKPOINT_FILES = (
    CONFIG_FILE,
    TOKENIZER_FILE,
    TRAINING_ARGS_FILE,
    WEIGHTS_FILE,
    SCORES_FILE,
    VISUAL_TRAINING_FILE,
)


def backbone_tokenizer(backbone_dir: str | Path) -> Tokenizer:
    """The backbone's fast tokenizer: its ``tokenizer.json``, or one converted by transformers from ``vocab.txt``."""
    path = Path(backbone_dir) / TOKENIZER_FILE
    if path.is_file():
        return load_tokenizer(path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir), use_fast=True).backend_tokenizer
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def create_model(
    task: Task, labels: list[str], backbone_dir: str | Path, **overrides: Any
) -> tuple[IMMPreTrainedModel, Preprocessor]:
    """A new model for ``task`` on the BERT-family backbone in ``backbone_dir``, plus its preprocessing."""
    config = IMMConfig.from_backbone(backbone_dir, task, labels, **overrides)
    tokenizer = backbone_tokenizer(backbone_dir)
    if task_spec(task).marks_entity_pair:
        add_entity_markers(tokenizer, config.preprocessing.entity_markers)
    config.backbone_config.vocab_size = max(config.backbone_config.vocab_size, tokenizer.get_vocab_size())
    model = build_task_model(config, backbone_dir)
    return model, Preprocessor(config.preprocessing, tokenizer)


def create_model_from_checkpoint(
    task: Task, labels: list[str], checkpoint_dir: str | Path, **overrides: Any
) -> tuple[IMMPreTrainedModel, Preprocessor]:
    """A new model for ``task`` whose encoder starts from another checkpoint's (the paper's cross-task
    setting, Table 3): every shared weight is copied, the head starts fresh."""
    source, source_preprocessor = load_checkpoint(checkpoint_dir)
    tokenizer = source_preprocessor.text.tokenizer
    if task_spec(task).marks_entity_pair:
        add_entity_markers(tokenizer, source.config.preprocessing.entity_markers)
    backbone = dataclasses.replace(
        source.config.backbone_config,
        vocab_size=max(source.config.backbone_config.vocab_size, tokenizer.get_vocab_size()),
    )
    config = dataclasses.replace(
        source.config, task=task, labels=list(labels), backbone_config=backbone, **overrides
    )
    model = build_task_model(config)
    target = model.encoder.state_dict()
    with torch.no_grad():
        for name, tensor in source.encoder.state_dict().items():
            if name not in target:
                continue
            rows = min(tensor.shape[0], target[name].shape[0])
            target[name][:rows] = tensor[:rows]
            if target[name].shape[0] > rows:  # rows for entity markers new to this vocabulary
                target[name][rows:] = tensor.mean(dim=0)
    return model, Preprocessor(config.preprocessing, tokenizer)


def write_checkpoint(
    directory: str | Path,
    model: IMMPreTrainedModel,
    preprocessor: Preprocessor,
    *,
    training_args: dict[str, Any] | None = None,
    scores: dict[str, Any] | None = None,
    visual_training: dict[str, Any] | None = None,
) -> None:
    """Writes the checkpoint's files into ``directory`` (a new generation's; not durable until
    its commit). Without ``visual_training``, readers derive it (see ``visual_training``)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    preprocessor.text.tokenizer.save(str(directory / TOKENIZER_FILE))
    documents = {TRAINING_ARGS_FILE: training_args or {}, SCORES_FILE: scores or {}}
    if visual_training is not None:
        documents[VISUAL_TRAINING_FILE] = visual_training
    for name, content in documents.items():
        (directory / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_checkpoint(
    directory: str | Path,
    model: IMMPreTrainedModel,
    preprocessor: Preprocessor,
    *,
    training_args: dict[str, Any] | None = None,
    scores: dict[str, Any] | None = None,
    visual_training: dict[str, Any] | None = None,
) -> Path:
    """Saves a checkpoint into ``directory`` as its next generation, switched in atomically (the
    previous one, if any, stays whole until the switch and is removed after it)."""
    directory = Path(directory)
    generation = next_generation(directory)
    write_checkpoint(
        generation / CHECKPOINT_DIR,
        model,
        preprocessor,
        training_args=training_args,
        scores=scores,
        visual_training=visual_training,
    )
    commit(directory, generation)
    return directory


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint (a committed generation, or flat files)."""
    return (resolve_checkpoint(directory) / WEIGHTS_FILE).is_file()


def load_checkpoint(
    directory: str | Path, map_location: str = "cpu"
) -> tuple[IMMPreTrainedModel, Preprocessor]:
    """Rebuilds the model and its preprocessing from a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    files = resolve_checkpoint(directory)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (files / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory} is not an IMM checkpoint: missing {', '.join(missing)}")
    try:
        config = IMMConfig.from_json_file(files / CONFIG_FILE)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{files / CONFIG_FILE}: {error}") from None
    model = build_task_model(config)
    model.load_state_dict(load_file(str(files / WEIGHTS_FILE), device=map_location))
    return model, Preprocessor.from_directory(files, config.preprocessing)


def read_json(directory: str | Path, name: str) -> dict[str, Any]:
    """The JSON file ``name`` of the checkpoint in ``directory`` ({} when it has none)."""
    path = resolve_checkpoint(directory) / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# --- how the visual path was trained ------------------------------------------------------------


def sw_status(training_args: dict[str, Any]) -> tuple[bool, str]:
    """Whether a run with these arguments trains with the SW loss, and why not."""
    if training_args.get("no_sw"):
        return False, "off: --no-sw given"
    if training_args.get("clip") is None:
        return False, "off: no --clip teacher given"
    if training_args.get("images") is None:
        return False, "off: it needs pictures and no --images directory was given"
    return True, "on"


def describe_visual_training(
    training_args: dict[str, Any],
    *,
    use_ia: bool,
    attention_mode: str,
    pictures_seen: int | None,
    examples_with_picture: int | None = None,
    training_examples: int | None = None,
) -> dict[str, Any]:
    """The ``visual_training`` record of a checkpoint: whether the picture can change its answers
    because its visual path learned from pictures (``trained``), and how it was trained.

    ``pictures_seen`` counts the training examples fed with their picture, over every epoch up to
    the checkpoint (None: not recorded, an older checkpoint). ``trained`` is false when no picture
    was seen or when nothing carries the picture to the text (``--no-ia`` with separate attention:
    then the picture cannot change an answer). Without any record (no ``images`` in the training
    arguments) the visual path is assumed trained: leaving a visual path out wrongly would change
    answers, keeping it wrongly only costs time.
    """
    reaches_text = use_ia or attention_mode == "joint"
    if pictures_seen is not None:
        source = "recorded"
    elif "images" in training_args:
        source = TRAINING_ARGS_FILE
    else:
        source = "unknown"
    if not reaches_text:
        trained, reason = False, "no path from the picture to the text (--no-ia with separate attention)"
    elif source == "unknown":
        trained, reason = True, "no record of how it was trained: assumed trained"
    elif training_args.get("images") is None:
        trained, reason = False, "trained without pictures (no --images)"
    elif pictures_seen == 0:
        trained, reason = False, "no training example was fed with its picture"
    elif pictures_seen is None:
        trained, reason = True, "trained with --images (pictures seen not recorded)"
    else:
        trained, reason = True, f"{pictures_seen} training examples were fed with their picture"
    sw, why = sw_status(training_args) if source != "unknown" else (None, None)
    return {
        "trained": trained,
        "reason": reason,
        "source": source,
        "pictures_seen": pictures_seen,
        "examples_with_picture": examples_with_picture,
        "training_examples": training_examples,
        "ia": use_ia,
        "attention_mode": attention_mode,
        "sw": sw,
        "sw_reason": why,
        "image_dropout": training_args.get("image_dropout"),
    }


def visual_training(directory: str | Path) -> dict[str, Any]:
    """Whether and how the visual path of the checkpoint in ``directory`` was trained.

    Its ``visual_training.json`` when there is one (``model.train`` writes it); for an older
    checkpoint, derived from ``training_args.json`` and ``config.json`` (``images`` None: the
    visual path was never trained), with ``source`` saying which."""
    files = resolve_checkpoint(directory)
    recorded = files / VISUAL_TRAINING_FILE
    if recorded.is_file():
        return json.loads(recorded.read_text(encoding="utf-8"))
    try:
        config = IMMConfig.from_json_file(files / CONFIG_FILE)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{directory} is not an IMM checkpoint: {error}") from None
    return describe_visual_training(
        read_json(directory, TRAINING_ARGS_FILE),
        use_ia=config.use_ia,
        attention_mode=config.attention_mode,
        pictures_seen=None,
    )
