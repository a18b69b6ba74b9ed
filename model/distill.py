"""Soft targets from an ensemble of teachers: ``python -m model.distill``.

Runs every teacher checkpoint (run directories of ``model.train``, e.g. the shipped recipe trained
with several seeds) over the ``--data`` files and writes the ensemble's soft targets for each
example to ``--out`` (safetensors; see ``model.distillation``): NER, the mean over the teachers of
each word's CRF marginals; RE, the mean of their softmax probabilities. A student then trains on
them with ``python -m model.train --soft-targets FILE`` on the same files, in the same order.

With ``--dev`` it first scores, per dev file, each teacher and the ensemble (NER: the argmax of
each word's mean marginals, and Viterbi over the mean emissions with the mean CRF scores; RE: the
argmax of the mean probabilities); the scores are printed as JSON on stdout and kept in the file.

``--format mnre-sentences`` (NER) reads the distinct sentences of MNRE files as unlabelled text:
their targets train a student with ``--unlabelled``, weighted by the ensemble's confidence.
Inference runs on the CPU with as many threads as OMP_NUM_THREADS allows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoint import CheckpointError
from model.cli_help import HelpFormatter, paragraph
from model.data import DataFormatError
from model.distillation import (
    DATA_FORMATS,
    DistillationError,
    ensemble_predictions,
    headline,
    load_teachers,
    read_data,
    soft_targets,
)
from model.evaluate import read_examples
from model.logs import configure as configure_logs
from model.tasks import TASKS, task_spec

log = logging.getLogger("model.distill")


def build_parser(prog: str = "python -m model.distill") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=paragraph(__doc__), formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--task", required=True, choices=list(TASKS))
    add(
        "--teacher",
        required=True,
        nargs="+",
        metavar="DIR",
        help="teacher checkpoints (model.train run directories)",
    )
    add(
        "--data",
        required=True,
        nargs="+",
        metavar="FILE",
        help="the files to write soft targets for, in order",
    )
    add("--out", required=True, metavar="FILE", help="the soft-targets file to write (safetensors)")
    add("--dev", nargs="+", metavar="FILE", help="dev files: score each teacher and the ensemble on them")
    add(
        "--format",
        choices=DATA_FORMATS,
        default="task",
        help="how --data is read: the task's labelled files (task), or the distinct sentences of MNRE "
        "files as unlabelled NER text (mnre-sentences)",
    )
    add("--images", help="directory of the tweet images (none: every example text-only)")
    add("--batch-size", type=int, default=64, help="examples per teacher call")
    return parser


def read_dev(task: str, files: Sequence[str]) -> dict[str, list]:
    dev = {}
    for path in files:
        dev[path] = read_examples(task, path)
        if not dev[path]:
            raise DistillationError(f"--dev {path} holds no examples")
    return dev


def score_dev(
    task: str, teachers, dev: dict[str, list], images: str | None, batch_size: int
) -> dict[str, Any]:
    """Each teacher's and the ensemble's scores per dev file, and their means over the files."""
    spec = task_spec(task)
    per_file: dict[str, Any] = {}
    for path, examples in dev.items():
        predictions = ensemble_predictions(
            teachers, examples, images=images, batch_size=batch_size, decode=True, description=f"dev {path}"
        )
        per_file[path] = {
            "examples": len(examples),
            "teachers": {
                name: headline(spec.score(examples, tags)) for name, tags in predictions.teachers.items()
            },
            "ensemble": {
                name: headline(spec.score(examples, tags)) for name, tags in predictions.ensemble.items()
            },
        }

    def mean(pick) -> float:
        return float(np.mean([pick(scores) for scores in per_file.values()]))

    first = next(iter(per_file.values()))
    return {
        "files": per_file,
        "mean_f1": {
            "teachers": {name: mean(lambda s, n=name: s["teachers"][n]["f1"]) for name in first["teachers"]},
            "ensemble": {name: mean(lambda s, n=name: s["ensemble"][n]["f1"]) for name in first["ensemble"]},
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch_size < 1:
        raise DistillationError("--batch-size must be at least 1")
    if args.images is not None and not Path(args.images).is_dir():
        raise FileNotFoundError(f"--images {args.images}: not a directory")
    # A bad file fails before any inference.
    examples = read_data(args.task, args.data, args.format)
    dev_sets = read_dev(args.task, args.dev or [])
    teachers = load_teachers(args.teacher, args.task)
    log.info("%d teachers, %d examples from %s", len(teachers), len(examples), ", ".join(args.data))
    dev = {}
    if dev_sets:
        dev = score_dev(args.task, teachers, dev_sets, args.images, args.batch_size)
        log.info("mean dev F1: %s", json.dumps(dev["mean_f1"]))
    predictions = ensemble_predictions(
        teachers, examples, images=args.images, batch_size=args.batch_size, description="soft targets"
    )
    targets = soft_targets(teachers, examples, args.data, predictions, data_format=args.format, dev=dev)
    targets.save(args.out)
    log.info("wrote the soft targets of %d examples to %s", len(targets), args.out)
    summary: dict[str, Any] = {
        "out": str(args.out),
        "task": args.task,
        "examples": len(targets),
        "labelled": targets.labelled,
        "mean_confidence": float(targets.confidence.mean()),
        "teachers": targets.teachers,
    }
    if dev:
        summary["dev"] = dev
    return summary


def main(argv: Sequence[str] | None = None, prog: str = "python -m model.distill") -> int:
    configure_logs("text")
    args = build_parser(prog).parse_args(argv)
    try:
        summary = run(args)
    except (DistillationError, CheckpointError, DataFormatError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
