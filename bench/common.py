"""What the benchmarks share: invented tweets, a photo-like JPEG, percentiles and timing summaries,
the CPU's name, and starting ``python -m service`` on a free loopback port.

The end-to-end benchmark is ``bench/run.py`` (``make bench``); the model-only ones are
``bench/model_latency.py`` (``make bench-model``) and ``bench/gpu_model.py``.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages
    sys.path.insert(0, str(ROOT))

from model.preprocessing.synthetic import synthetic_jpeg  # noqa: E402

TWEETS = [
    "RT @NBA: LeBron James scores 40 as the Lakers beat the Celtics in Boston #NBAFinals",
    "Great morning run along the Thames in London with @sarah_k 🏃‍♀️ #marathon",
    "Obama's speech in Chicago tonight was amazing ! http://t.co/xyz123",
    "Just landed in Tokyo 🇯🇵 can't wait to see the Giants play tomorrow",
    "Apple unveils the new iPhone at its Cupertino headquarters ; Tim Cook on stage",
    "Messi and Neymar train with Barcelona ahead of Real Madrid clash #ElClasico",
    "Taylor Swift announces world tour dates for Paris , Berlin and New York :)",
    "Watching the Yankees vs Red Sox at Fenway with my dad ⚾️ #MLB",
]


#: The benchmarks' photo: a synthetic JPEG of the given size (quality 85, mild noise), the same bytes in
#: every run (``photo_jpeg(1200, 900)``).
photo_jpeg = functools.partial(synthetic_jpeg, quality=85, noise=12.0)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of already sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    settings: dict[str, str],
    log_path: Path | None = None,
    ready_timeout_s: float = 180,
    cpus: set[int] | None = None,
) -> tuple[subprocess.Popen, str]:
    """``python -m service`` in a subprocess on a free loopback port, with these ``IMM_*`` settings
    (any ``IMM_*`` of this environment is dropped first), on ``cpus`` only when given (its affinity
    mask, as ``taskset``: it sizes itself from it); returns once ``/ready`` answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMM_")}
    env.update(
        IMM_HOST="127.0.0.1",
        IMM_PORT=str(port),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    env.update(settings)
    log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "service"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log if log_path else None,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    finally:
        if log_path is not None:
            log.close()  # the child holds its own descriptor
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.terminate()
    raise SystemExit(f"the server did not become ready within {ready_timeout_s:.0f} s")


def summarise(wall: list[float], cpu: list[float] | None = None) -> dict[str, float]:
    """p50/p99/mean/min of per-call wall times in ms, and p50/p99 of their CPU times when given."""
    values = np.asarray(wall)
    summary = {
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
    }
    if cpu is not None:
        summary |= {"cpu_p50_ms": float(np.percentile(cpu, 50)), "cpu_p99_ms": float(np.percentile(cpu, 99))}
    return summary | {"n": len(wall)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
