"""``imm``: the project's commands in one place (each is also its ``python -m`` form).

    imm serve       the HTTP server (python -m service)
    imm train       train a model (python -m model.train)
    imm evaluate    score a checkpoint or a bundle on a dataset file (python -m model.evaluate,
                    python -m export.evaluate)
    imm export      a checkpoint to an ONNX serving bundle (python -m export)
    imm extract     entities and relations for every row of a corpus file

``imm COMMAND --help`` says more; ``imm --version`` the installed version. Errors are one line on
stderr, with exit status 2. ``train``, ``evaluate`` and ``export`` need PyTorch (the ``train`` extra).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def _serve(argv: list[str]) -> int:
    from service.__main__ import main

    return main(argv, prog="imm serve")


def _train(argv: list[str]) -> int:
    from model.train import main

    return main(argv, prog="imm train")


def _evaluate(argv: list[str]) -> int:
    from model.evaluate import build_parser
    from model.evaluate import main as evaluate_checkpoint

    # One --help for both, --checkpoint and --bundle as alternatives; each layer then reads its own.
    if build_parser("imm evaluate", bundles=True).parse_args(argv).bundle is not None:
        from export.evaluate import main as evaluate_bundle

        return evaluate_bundle(argv, prog="imm evaluate")
    return evaluate_checkpoint(argv, prog="imm evaluate")


def _export(argv: list[str]) -> int:
    from export.__main__ import main

    return main(argv, prog="imm export")


def _extract(argv: list[str]) -> int:
    from imm.extract import main

    return main(argv, prog="imm extract")


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_serve, "the HTTP server"),
    "train": (_train, "train a model"),
    "evaluate": (_evaluate, "score a checkpoint (--checkpoint) or a bundle (--bundle) on a dataset file"),
    "export": (_export, "a checkpoint to an ONNX serving bundle"),
    "extract": (_extract, "entities and relations for every row of a corpus file"),
}


#: What the commands that train or read checkpoints need beyond the plain install.
TRAINING_MODULES = {"torch", "transformers", "torchcrf", "safetensors", "seqeval", "onnx", "onnxscript"}


def usage(prog: str = "imm") -> str:
    lines = [
        f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for each; {prog} --version)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "imm") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(prog))
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from imm import __version__

        print(f"imm {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n{usage(prog)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command][0](rest)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] not in TRAINING_MODULES:
            raise
        from imm import DISTRIBUTION

        print(
            f"error: {prog} {command} needs {error.name}, of the train extra: "
            f"pip install '{DISTRIBUTION}[train]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
