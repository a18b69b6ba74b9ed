"""``python -m export --checkpoint DIR --out DIR [--precision fp32|fp16|int8|int8-weight-only]
[--opset N] [--triton DIR]``.

On success one summary line goes to stdout. Any error is one line ``error: ...`` on stderr and
exit status 2 (1 for an unexpected internal failure); never a traceback, and nothing at ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from export.bundle import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, PRECISIONS, BundleError
from export.checks import ExportError, check_export_arguments, safe_model_name
from export.triton import TritonRepositoryError, check_repository_target
from model.cli_help import HelpFormatter

USAGE_ERROR = 2
INTERNAL_ERROR = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the usage block first; keep errors to one line.
        self.exit(USAGE_ERROR, f"error: {message} (see --help)\n")


def build_parser(prog: str = "python -m export") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Export an IMM checkpoint to an ONNX serving bundle.",
        formatter_class=HelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (written by model.train)")
    source.add_argument(
        "--from-bundle",
        metavar="BUNDLE",
        help="re-export a bundle from its own weights (at another precision, or with this version's "
        "graph) when its checkpoint is not at hand; an int8 bundle gives its int8-rounded weights",
    )
    parser.add_argument(
        "--out", required=True, help="bundle directory to write (replaced if it holds a bundle)"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default); int8 (integer MatMuls, one activation scale per token: about twice as "
        "fast on the CPU, a quarter of the size); int8-weight-only (int8 weights, fp32 compute); fp16",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})",
    )
    parser.add_argument(
        "--triton", metavar="DIR", help="also write the model into this Triton model repository"
    )
    parser.add_argument(
        "--name", help="model name in the manifest and in Triton (default: the checkpoint's directory name)"
    )
    return parser


def main(
    argv: Sequence[str] | None = None, *, prog: str = "python -m export", source: str | None = None
) -> int:
    args = build_parser(prog).parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.from_bundle is not None:
            return _from_bundle(args)
        # Cheap checks first: a wrong path should not wait for torch to import.
        check_export_arguments(
            Path(args.checkpoint),
            Path(args.out),
            args.precision,
            DEFAULT_OPSET if args.opset is None else args.opset,
        )
        if args.triton:
            check_repository_target(
                Path(args.triton), safe_model_name(args.name or Path(args.checkpoint).resolve().name)
            )
        from export.onnx_export import export_bundle

        export_bundle(
            args.checkpoint,
            args.out,
            precision=args.precision,
            opset=args.opset,
            triton_dir=args.triton,
            name=args.name,
            source=source,
            log=lambda message: print(
                message, file=sys.stderr if message.startswith("warning") else sys.stdout
            ),
        )
    except (ExportError, BundleError, TritonRepositoryError, OSError, ValueError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI promises one line, never a traceback
        print(
            f"error: export failed unexpectedly: {type(error).__name__}: {_one_line(error)}", file=sys.stderr
        )
        return INTERNAL_ERROR
    return 0


def _from_bundle(args: argparse.Namespace) -> int:
    """``--from-bundle``: the bundle's weights as a temporary checkpoint, exported as usual."""
    import tempfile

    from export.bundle import load_bundle

    bundle = load_bundle(args.from_bundle)  # a BundleError names what is wrong with it
    from export.onnx_export import checkpoint_from_bundle

    with tempfile.TemporaryDirectory(prefix="imm-from-bundle-") as work:
        checkpoint = checkpoint_from_bundle(bundle.directory, Path(work) / bundle.directory.name)
        forwarded = [
            "--checkpoint", str(checkpoint), "--out", args.out, "--precision", args.precision,
            "--name", args.name or bundle.manifest["model_name"],
            *(["--opset", str(args.opset)] if args.opset is not None else []),
            *(["--triton", args.triton] if args.triton else []),
        ]  # fmt: skip
        return main(forwarded, source=f"bundle {bundle.directory} ({bundle.name})")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:497] + "..."


if __name__ == "__main__":
    sys.exit(main())
