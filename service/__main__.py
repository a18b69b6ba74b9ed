"""``python -m service``: the server on uvicorn, configured from ``IMM_*`` environment variables.

One process by default; ``IMM_WORKERS`` runs several on one port (``service.server``). Each
process batches its own requests, so more workers mean smaller batches: take them when parsing
requests, not the model, is what keeps a core busy (a GPU, or many cores).
"""

from __future__ import annotations

import logging
import logging.config
import sys

from pydantic import ValidationError

from service.observability import logging_config
from service.server import run
from service.settings import Settings


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"invalid IMM_* configuration:\n{error}", file=sys.stderr)
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
