"""Checkpoint directories and the model factory.

A checkpoint is a directory (the contract with ``model.evaluate``, ``export`` and ``--init-from``)::

    model.safetensors     weights (never pickled)
    config.json           IMMConfig: task, labels, hyper-parameters, preprocessing constants
    tokenizer.json        the tokenizer, entity markers included for RE
    training_args.json    how it was trained
    scores.json           its dev scores

It is written into a temporary sibling directory and moved into place, so a reader never sees
a half-written file and an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from model.config import IMMConfig, Task
from model.imm import CONFIG_FILE, TASK_MODELS, WEIGHTS_FILE, IMMPreTrainedModel
from model.preprocessing import TOKENIZER_FILE, Preprocessor, add_entity_markers, load_tokenizer

TRAINING_ARGS_FILE = "training_args.json"
SCORES_FILE = "scores.json"


class CheckpointError(ValueError):
    """A directory that is not a usable checkpoint."""


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
    if task == "re":
        add_entity_markers(tokenizer, config.preprocessing.entity_markers)
    config.backbone_config.vocab_size = max(config.backbone_config.vocab_size, tokenizer.get_vocab_size())
    model = TASK_MODELS[task].from_backbone(config, backbone_dir)
    return model, Preprocessor(config.preprocessing, tokenizer)


def create_model_from_checkpoint(
    task: Task, labels: list[str], checkpoint_dir: str | Path, **overrides: Any
) -> tuple[IMMPreTrainedModel, Preprocessor]:
    """A new model for ``task`` whose encoder starts from another checkpoint's (the paper's cross-task
    setting, Table 3): every shared weight is copied, the head starts fresh."""
    source, source_preprocessor = load_checkpoint(checkpoint_dir)
    tokenizer = source_preprocessor.text.tokenizer
    if task == "re":
        add_entity_markers(tokenizer, source.config.preprocessing.entity_markers)
    backbone = dataclasses.replace(
        source.config.backbone_config,
        vocab_size=max(source.config.backbone_config.vocab_size, tokenizer.get_vocab_size()),
    )
    config = dataclasses.replace(
        source.config, task=task, labels=list(labels), backbone_config=backbone, **overrides
    )
    model = TASK_MODELS[task](config)
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


def save_checkpoint(
    directory: str | Path,
    model: IMMPreTrainedModel,
    preprocessor: Preprocessor,
    *,
    training_args: dict[str, Any] | None = None,
    scores: dict[str, Any] | None = None,
) -> Path:
    """Writes the checkpoint atomically (temporary directory, then rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(staging)
        preprocessor.text.tokenizer.save(str(staging / TOKENIZER_FILE))
        for name, content in ((TRAINING_ARGS_FILE, training_args), (SCORES_FILE, scores)):
            (staging / name).write_text(
                json.dumps(content or {}, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


# Replaced in this order, so that scores.json, written last, always describes the weights beside it.
CHECKPOINT_FILES = (CONFIG_FILE, TOKENIZER_FILE, TRAINING_ARGS_FILE, WEIGHTS_FILE, SCORES_FILE)


def _replace_directory(source: Path, target: Path) -> None:
    """A new checkpoint is renamed into place whole; an existing one is updated file by file
    (each rename atomic), which keeps what a training run stores beside it (metrics, state)."""
    if not target.exists():
        os.replace(source, target)
        return
    for name in CHECKPOINT_FILES:
        os.replace(source / name, target / name)
    shutil.rmtree(source, ignore_errors=True)


def load_checkpoint(
    directory: str | Path, map_location: str = "cpu"
) -> tuple[IMMPreTrainedModel, Preprocessor]:
    """Rebuilds the model and its preprocessing from a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    missing = [
        name for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (directory / name).is_file()
    ]
    if missing:
        raise CheckpointError(f"{directory} is not an IMM checkpoint: missing {', '.join(missing)}")
    try:
        config = IMMConfig.from_json_file(directory / CONFIG_FILE)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {error}") from None
    model = TASK_MODELS[config.task].from_pretrained(directory, map_location=map_location)
    return model, Preprocessor.from_directory(directory, config.preprocessing)


def read_json(directory: str | Path, name: str) -> dict[str, Any]:
    path = Path(directory) / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
