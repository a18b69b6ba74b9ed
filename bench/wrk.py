"""Throughput with wrk, a C load generator: it costs the server's machine little CPU, unlike a Python
client (on 2 cores ``make bench``'s httpx client took as much CPU per request as the server did,
and its own collapse at concurrency 64 was read as the server's).

``bench/run.py --load-generator wrk`` calls ``run_wrk`` for each level: the scenario's multipart
bodies are written to files once (a few hundred distinct tweets, with the scenario's picture),
then ``wrk`` POSTs them in turn at the level's concurrency for a fixed time
(``bench/wrk/multipart.lua``, which prints one JSON line of counts and latency percentiles).
Debian's ``wrk`` package; ``make bench`` installs it when missing (as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent / "wrk" / "multipart.lua"


def multipart_body(boundary: str, fields: dict[str, str], image: bytes | None) -> bytes:
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    if image is not None:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        )
        parts.append(head.encode() + image + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


def available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    endpoint: str,
    requests: list[tuple[dict[str, str], bytes | None]],
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    """wrk at ``concurrency`` connections for ``seconds``, cycling over ``requests`` (form fields, picture).

    Returns what the level's row needs: requests answered, errors by kind, latency percentiles (ms)
    and throughput. wrk counts an answer that is not 2xx/3xx as a status error.
    """
    if not available():
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    boundary = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="imm-wrk-") as work:
        listing = Path(work) / "bodies.txt"
        names = []
        for number, (fields, image) in enumerate(requests):
            path = Path(work) / f"{number}.body"
            path.write_bytes(multipart_body(boundary, fields, image))
            names.append(str(path))
        listing.write_text("\n".join(names) + "\n", encoding="utf-8")
        env = dict(os.environ, WRK_PATH=endpoint, WRK_BODIES=str(listing), WRK_BOUNDARY=boundary)
        threads = max(1, min(concurrency, (os.cpu_count() or 2) // 2, 4))
        command = [
            "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
            "-s", str(SCRIPT), url.rstrip("/") + endpoint,
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:] or done.stdout[-500:]}"
        )
    result = json.loads(lines[-1])
    errors = {
        kind: result[f"errors_{kind}"]
        for kind in ("connect", "read", "write", "status", "timeout")
        if result[f"errors_{kind}"]
    }
    answered = result["requests"]
    wall = result["duration_us"] / 1e6
    return {
        "sent": answered,
        "ok": answered - errors.get("status", 0),
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "wall_s": round(wall, 3),
        "p50_ms": round(result["p50_us"] / 1000, 2),
        "p90_ms": round(result["p90_us"] / 1000, 2),
        "p99_ms": round(result["p99_us"] / 1000, 2),
        "max_ms": round(result["max_us"] / 1000, 2),
        "mean_ms": round(result["mean_us"] / 1000, 2),
        "throughput_rps": round((answered - errors.get("status", 0)) / wall, 2) if wall else None,
        "load_generator": f"wrk -t{threads}",
    }
