"""``python -m service`` (``imm serve``): the server on uvicorn, configured by its options, then
``IMM_*`` environment variables, then ``KEY=VALUE`` lines of a ``.env`` file in the working directory.

One process by default; ``--workers`` (``IMM_WORKERS``) runs several on one port (``service.server``).
Each process batches its own requests, so more workers mean smaller batches: take them when parsing
requests, not the model, is what keeps a core busy (a GPU, or many cores).
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import sys
from collections.abc import MutableMapping, Sequence

from pydantic import ValidationError

from engine.settings import Settings, unknown_variables
from model.cli_help import HelpFormatter
from service.observability import logging_config
from service.server import run

#: The settings that are also options: option -> setting (its variable is IMM_ + the upper-case name).
OPTIONS = {"host": "host", "port": "port", "workers": "workers", "ner": "ner_bundle", "re": "re_bundle"}


def build_parser(prog: str = "python -m service") -> argparse.ArgumentParser:
    """The options above, and every ``IMM_*`` setting with its default in the epilog."""
    fields = Settings.model_fields
    lines = []
    for name, field in fields.items():
        default = field.default if field.default is not None else "unset"
        lines.append(f"  IMM_{name.upper():<24} {field.description or ''} (default: {default})")
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the IMM models over HTTP (POST /ner, /re, /extract; the API at /docs).\n"
        "Each setting comes from its option, else its IMM_* environment variable, else a KEY=VALUE\n"
        "line of a .env file in the working directory, else its default (docs/service.md).",
        epilog="settings (IMM_* variables):\n" + "\n".join(lines),
        formatter_class=HelpFormatter,
    )

    def variable(option: str) -> str:
        return f"IMM_{OPTIONS[option].upper()}"

    def default(option: str) -> str:
        return f"${variable(option)}, else {fields[OPTIONS[option]].default}"

    parser.add_argument(
        "--host", help=f"address to listen on, 0.0.0.0 for every interface (default: {default('host')})"
    )
    parser.add_argument("--port", type=int, help=f"port to listen on (default: {default('port')})")
    parser.add_argument(
        "--workers",
        type=int,
        help=f"server processes on the one port; 0: 1 with ONNX Runtime, 4 with the PyTorch runtime "
        f"(default: {default('workers')})",
    )
    parser.add_argument(
        "--ner",
        metavar="BUNDLE",
        help=f"NER bundle directory; '' or 'off' switches /ner off (default: {default('ner')})",
    )
    parser.add_argument(
        "--re",
        metavar="BUNDLE",
        help=f"RE bundle directory; '' or 'off' switches /re off (default: {default('re')})",
    )
    return parser


def apply_options(args: argparse.Namespace, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """The options given become their ``IMM_*`` variables in ``environ``: above the environment and
    ``.env`` for ``Settings()``, and read again by each of uvicorn's worker processes
    (``service.server``), which inherit this environment. Returns {setting: option} of those given."""
    given = {}
    for option, value in vars(args).items():
        if value is not None:
            environ[f"IMM_{OPTIONS[option].upper()}"] = str(value)
            given[OPTIONS[option]] = f"--{option}"
    return given


def main(argv: Sequence[str] | None = None, prog: str = "python -m service") -> int:
    given = apply_options(build_parser(prog).parse_args(argv))
    try:
        settings = Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"{given.get(str(problem['loc'][0])) or 'IMM_' + '_'.join(map(str, problem['loc'])).upper()}: "
            f"{problem['msg']}"
            for problem in error.errors()
        )
        print(f"error: invalid configuration: {problems}", file=sys.stderr)
        return 2
    logging.config.dictConfig(logging_config(settings.log_level))
    log = logging.getLogger("service")
    for warning in unknown_variables():
        log.warning(warning)
    log.info(
        "starting on http://%s:%d (NER bundle: %s, RE bundle: %s, runtime: %s, API key: %s)",
        settings.host,
        settings.port,
        settings.ner_bundle,
        settings.re_bundle,
        settings.runtime,
        "set" if settings.api_key else "none",
    )
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
