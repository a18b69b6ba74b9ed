"""Score a serving bundle on a dataset file exactly as it is served: its ONNX graph on ONNX
Runtime (CPU) with the server's session options and the served decoding (``export.outputs``), so
an int8 or fp16 export is judged by what it will answer. ``python -m export.evaluate --bundle DIR
--data FILE`` (or ``imm evaluate --bundle``); the same options and JSON as ``model.evaluate``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from export.bundle import Bundle, BundleError, load_bundle, session_options
from export.outputs import decode_outputs
from model.cli_help import HelpFormatter, paragraph
from model.data import DataFormatError
from model.data.dataset import Example
from model.data.images import ImageStore
from model.evaluate import _batches, _full_length, add_data_arguments, load_examples, progress, report
from model.preprocessing import Preprocessor, load_tokenizer
from model.tasks import task_spec


def predict_bundle(
    bundle: Bundle,
    preprocessor: Preprocessor,
    examples: Sequence[Example],
    images: ImageStore | None = None,
    *,
    batch_size: int = 32,
) -> list:
    """``model.evaluate.predict`` for a serving bundle: label names per example."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(bundle.model_path), session_options(), providers=["CPUExecutionProvider"]
    )
    has_crf = task_spec(bundle.task).has_crf
    predictions: list = []
    batches = _batches(preprocessor, examples, images, batch_size)
    for chunk, arrays in progress(batches, len(examples), batch_size):
        (output,) = session.run(None, {name: arrays[name] for name in bundle.input_names})
        decoded = decode_outputs(bundle.task, output, arrays["word_mask"], bundle.crf, confidence=False)
        if has_crf:
            labels = [[bundle.labels[i] for i in row] for row in decoded.tags]
        else:
            labels = [bundle.labels[i] for i in decoded.argmax(axis=-1).tolist()]
        predictions.extend(_full_length(bundle.task, labels, chunk))
    return predictions


def build_parser(prog: str = "python -m export.evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=paragraph(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("--bundle", required=True, help="serving bundle written by python -m export")
    add_data_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m export.evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        bundle = load_bundle(args.bundle)
        preprocessor = Preprocessor(bundle.preprocessing, load_tokenizer(bundle.tokenizer_path))
        examples = load_examples(bundle.task, args)
    except (FileNotFoundError, BundleError, DataFormatError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    images = ImageStore(None if args.no_images else args.images, preprocessor.image)
    images.report([e.image_id for e in examples], args.data)
    predictions = predict_bundle(bundle, preprocessor, examples, images, batch_size=args.batch_size)
    report(bundle.task, examples, images, predictions, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
