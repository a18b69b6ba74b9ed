"""``python -m service.healthcheck``: exit 0 when the local server's /ready says ready (Docker HEALTHCHECK).

Stdlib only and quick: it runs every few seconds inside the container.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("IMM_PORT", "8000")
    url = f"http://127.0.0.1:{port}/ready"
    try:
        with urllib.request.urlopen(
            url, timeout=float(os.environ.get("IMM_HEALTHCHECK_TIMEOUT", "2"))
        ) as answer:
            return 0 if answer.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError) as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
