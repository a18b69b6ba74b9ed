"""``python -m service``: the server on uvicorn, configured from ``IMM_*`` environment variables.

One process, one event loop: dynamic batching gathers requests within the process, so scale
with ONNX Runtime threads (``IMM_INTRA_OP_THREADS``) or more containers, not uvicorn workers.
"""

from __future__ import annotations

import logging
import logging.config
import sys

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.observability import logging_config
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
        "starting on http://%s:%d (NER bundle: %s, RE bundle: %s, providers: %s, API key: %s)",
        settings.host,
        settings.port,
        settings.ner_bundle,
        settings.re_bundle,
        settings.providers,
        "set" if settings.api_key else "none",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the JSON logging configured above
        access_log=False,  # RequestContextMiddleware writes one line per request
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.keep_alive_s,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
