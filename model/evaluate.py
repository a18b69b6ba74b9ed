"""Evaluate a checkpoint on a dataset file: ``python -m model.evaluate --checkpoint DIR`` (or
``imm evaluate``). A serving bundle is scored by ``export.evaluate`` (``imm evaluate --bundle``),
the layer that reads bundles.

Prints one JSON object on stdout: micro ``precision``, ``recall``, ``f1`` (0-1), per-type (NER)
or per-relation (RE) scores, and the number of examples and of missing images. The scores
are the paper's: seqeval's default mode for NER, micro-F1 over all relations but ``None`` for
MNRE. Training selects its checkpoints with the same functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.cli_help import HelpFormatter, paragraph
from model.data import DataFormatError, NERExample, REExample
from model.data.dataset import Example, encode_example
from model.data.images import ImageStore
from model.decoding import bio_spans
from model.modeling import IMMPreTrainedModel
from model.preprocessing import Preprocessor
from model.tasks import task_spec

log = logging.getLogger("model.evaluate")


def read_examples(task: str, path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return task_spec(task).read(path)


def _batches(
    preprocessor: Preprocessor, examples: Sequence[Example], images: ImageStore | None, batch_size: int
):
    """(examples, collated arrays) per batch, through the shared preprocessing."""
    images = images or ImageStore(None, preprocessor.image)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = [encode_example(preprocessor, example) for example in chunk]
        pictures = [images.load(example.image_id) for example in chunk]
        arrays = preprocessor.collate(
            texts, [None if p is None else preprocessor.image.to_array(p) for p in pictures]
        )
        yield chunk, arrays


def progress(batches, examples: int, batch_size: int):
    """``batches`` with a progress bar on stderr (tqdm; quiet when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(
        batches,
        total=-(-examples // batch_size),
        unit="batch",
        desc="evaluating",
        disable=None,
        file=sys.stderr,
    )


def _full_length(task: str, labels: list, chunk: Sequence[Example]) -> list:
    """Tags per word: words cut off by the sequence limit are predicted ``O`` (they still count in
    the gold)."""
    if not task_spec(task).labels_per_word:
        return labels
    return [tags + ["O"] * (len(e.words) - len(tags)) for tags, e in zip(labels, chunk)]


@torch.no_grad()
def predict(
    model: IMMPreTrainedModel,
    preprocessor: Preprocessor,
    examples: Sequence[Example],
    images: ImageStore | None = None,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> list:
    """Label names per example: a tag per word (words cut by truncation get ``O``) or a relation."""
    model.eval()
    predictions: list = []
    for chunk, arrays in progress(
        _batches(preprocessor, examples, images, batch_size), len(examples), batch_size
    ):
        batch = {name: torch.from_numpy(array).to(device) for name, array in arrays.items()}
        predictions.extend(_full_length(model.config.task, model.predict(**batch), chunk))
    return predictions


def score(task: str, examples: Sequence[Example], predictions: list) -> dict[str, Any]:
    return task_spec(task).score(examples, predictions)


def evaluate(
    model: IMMPreTrainedModel,
    preprocessor: Preprocessor,
    examples: Sequence[Example],
    images: ImageStore,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Any], list]:
    predictions = predict(model, preprocessor, examples, images, batch_size=batch_size, device=device)
    return scored(model.config.task, examples, images, predictions), predictions


def scored(task: str, examples: Sequence[Example], images: ImageStore, predictions: list) -> dict[str, Any]:
    """The scores of ``predictions``, with the number of examples and of missing images."""
    scores = score(task, examples, predictions)
    scores["examples"] = len(examples)
    image_ids = [e.image_id for e in examples]
    scores["missing_images"] = len(examples) - images.count_available(image_ids) + len(images.unreadable)
    return scores


def prediction_records(examples: Sequence[Example], predictions: list) -> list[dict[str, Any]]:
    """One JSON-ready record per example, with entity spans (as the server assembles them) for NER."""
    records = []
    for example, prediction in zip(examples, predictions):
        record: dict[str, Any] = {"words": list(example.words), "image_id": example.image_id}
        if isinstance(example, NERExample):
            record.update(gold=list(example.tags), pred=prediction)
            record["entities"] = [
                {"type": kind, "start": start, "end": end, "text": " ".join(example.words[start:end])}
                for kind, start, end in bio_spans(prediction)
            ]
        elif isinstance(example, REExample):
            record.update(
                head=list(example.head), tail=list(example.tail), gold=example.relation, pred=prediction
            )
        records.append(record)
    return records


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every evaluation takes (a checkpoint's here, a bundle's in ``export.evaluate``)."""
    parser.add_argument("--data", required=True, help="a Twitter CoNLL file (NER) or an MNRE file (RE)")
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--images", help="directory of the tweet images")
    images.add_argument("--no-images", action="store_true", help="evaluate as if no example had an image")
    parser.add_argument("--predictions", help="write per-example predictions to this JSONL file")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per model call")


def build_parser(prog: str = "python -m model.evaluate", *, bundles: bool = False) -> argparse.ArgumentParser:
    """The options of a checkpoint's evaluation; with ``bundles`` (``imm evaluate``) ``--bundle`` too, as
    the alternative to ``--checkpoint`` (export's layer scores it: ``export.evaluate``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=paragraph(__doc__),
        formatter_class=HelpFormatter,
        epilog=None
        if bundles
        else "A serving bundle, scored exactly as served: imm evaluate --bundle DIR --data FILE "
        "(python -m export.evaluate), with the same options but --device.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory written by model.train")
    if bundles:
        source.add_argument(
            "--bundle",
            help="serving bundle written by imm export, scored exactly as served: its ONNX graph on "
            "ONNX Runtime (CPU) with the served decoding",
        )
    add_data_arguments(parser)
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the checkpoint runs (not with --bundle)",
    )
    return parser


def load_examples(task: str, args: argparse.Namespace) -> list[Example]:
    """``--data``'s examples for ``task`` (``ValueError`` naming the problem when there are none)."""
    if args.images is not None and not Path(args.images).is_dir():
        raise FileNotFoundError(f"--images {args.images}: not a directory")
    examples = read_examples(task, args.data)
    if not examples:
        raise ValueError(f"{args.data} holds no examples")
    return examples


def report(task: str, examples: Sequence[Example], images: ImageStore, predictions: list, args) -> None:
    """Prints the scores as JSON; writes ``--predictions``."""
    scores = scored(task, examples, images, predictions)
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as handle:
            for record in prediction_records(examples, predictions):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(json.dumps(scores, indent=2))


def main(argv: Sequence[str] | None = None, prog: str = "python -m model.evaluate") -> int:
    from model.checkpoint import CheckpointError, load_checkpoint

    if "--bundle" in (sys.argv[1:] if argv is None else argv):  # export's layer reads bundles
        print(
            "error: a bundle is scored by imm evaluate --bundle DIR (or python -m export.evaluate)",
            file=sys.stderr,
        )
        return 2
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        model, preprocessor = load_checkpoint(args.checkpoint)
        task = model.config.task
        examples = load_examples(task, args)
    except (FileNotFoundError, CheckpointError, DataFormatError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    images = ImageStore(None if args.no_images else args.images, preprocessor.image)
    images.report([e.image_id for e in examples], args.data)
    model.to(args.device)
    predictions = predict(
        model, preprocessor, examples, images, batch_size=args.batch_size, device=args.device
    )
    report(task, examples, images, predictions, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
