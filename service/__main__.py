"""``python -m service``: the server on uvicorn, configured from ``IMM_*`` environment variables.

One process by default; ``IMM_WORKERS`` runs several on one port (``service.server``). Each
process batches its own requests, so more workers mean smaller batches: take them when parsing
requests, not the model, is what keeps a core busy (a GPU, or many cores).
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from engine.settings import Settings
from service.observability import logging_config
from service.server import run


def build_parser(prog: str = "python -m service") -> argparse.ArgumentParser:
    """``--help`` with every setting: the server takes no options, only ``IMM_*`` variables."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else "unset"
        lines.append(f"  IMM_{name.upper():<24} {field.description or ''} (default: {default})")
    return argparse.ArgumentParser(
        prog=prog,
        description="Serve the IMM models over HTTP (POST /ner, /re, /extract; the API at /docs). "
        "Configured by IMM_* environment variables, or KEY=VALUE lines of a .env file in the working "
        "directory (the environment wins); docs/service.md has the details.",
        epilog="settings:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Sequence[str] | None = None, prog: str = "python -m service") -> int:
    build_parser(prog).parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"IMM_{'_'.join(str(part) for part in problem['loc']).upper()}: {problem['msg']}"
            for problem in error.errors()
        )
        print(f"error: invalid configuration: {problems}", file=sys.stderr)
        return 2
    logging.config.dictConfig(logging_config(settings.log_level))
    log = logging.getLogger("service")
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
