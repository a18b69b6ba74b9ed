"""End-to-end latency of the inference service, measured from a separate client process.

Drives ``POST /ner`` of a running server (``--url``), or of one it starts itself (``--spawn``:
``python -m service`` in a subprocess on a free loopback port), with an asyncio httpx client at
each given concurrency, for two workloads: text with a 1200x900 JPEG, and text only. Every run is
bounded by a request count and a time limit. Prints a table (p50/p99/mean latency, throughput,
mean server batch size) and writes it as JSON.

    python bench/e2e_latency.py --spawn --ner-bundle weights/ner --concurrency 1 16
    python bench/e2e_latency.py --url http://127.0.0.1:8000 --requests 300

Latency is wall time from sending the request to having read the whole answer, as a client sees
it; on a small machine the client competes with the server for the CPU (say so with the numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

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


def photo_jpeg(width: int, height: int, quality: int = 85, seed: int = 0) -> bytes:
    """A photo-like JPEG (gradients plus noise) of the given size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of already sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def batch_stats(metrics: str) -> tuple[float, float]:
    """(sum, count) of the server's NER batch-size histogram."""
    values = {}
    for name in ("imm_batch_size_sum", "imm_batch_size_count"):
        found = re.search(rf'^{name}\{{model="ner"\}} ([0-9.e+-]+)$', metrics, re.MULTILINE)
        values[name] = float(found.group(1)) if found else 0.0
    return values["imm_batch_size_sum"], values["imm_batch_size_count"]


async def run_level(
    url: str, concurrency: int, image: bytes | None, requests: int, max_seconds: float, warmup: int
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def post(number: int) -> float:
            files = {"image": ("photo.jpg", image, "image/jpeg")} if image is not None else None
            started = time.perf_counter()
            answer = await client.post("/ner", data={"text": TWEETS[number % len(TWEETS)]}, files=files)
            elapsed = time.perf_counter() - started
            if answer.status_code != 200:
                raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:200]}")
            return elapsed

        for number in range(warmup):  # connections, caches; not measured
            await post(number)
        before = batch_stats((await client.get("/metrics")).text)
        latencies: list[float] = []
        errors: list[str] = []
        next_number = 0
        deadline = time.perf_counter() + max_seconds

        async def worker() -> None:
            nonlocal next_number
            while next_number < requests and time.perf_counter() < deadline:
                number = next_number
                next_number += 1
                try:
                    latencies.append(await post(number))
                except (RuntimeError, httpx.HTTPError) as error:
                    errors.append(str(error))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        after = batch_stats((await client.get("/metrics")).text)
    latencies.sort()
    batches = after[1] - before[1]
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 2) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
        "throughput_rps": round(len(latencies) / wall, 1) if wall else None,
        "mean_batch_size": round((after[0] - before[0]) / batches, 2) if batches else None,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    settings: dict[str, str], log_path: Path | None = None, ready_timeout_s: float = 180
) -> tuple[subprocess.Popen, str]:
    """``python -m service`` in a subprocess on a free loopback port, with these ``IMM_*`` settings
    (any ``IMM_*`` of this environment is dropped first); returns once ``/ready`` answers 200."""
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
            [sys.executable, "-m", "service"], env=env, cwd=ROOT, stdout=log, stderr=log if log_path else None
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


def spawn_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    settings = {"IMM_NER_BUNDLE": str(args.ner_bundle), "IMM_RE_BUNDLE": "", "IMM_LOG_LEVEL": "warning"}
    for assignment in args.server_env:
        key, _, value = assignment.partition("=")
        settings[key] = value
    return start_server(settings, ready_timeout_s=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--spawn", action="store_true", help="start `python -m service` in a subprocess")
    parser.add_argument("--ner-bundle", type=Path, default=ROOT / "weights" / "ner", help="with --spawn")
    parser.add_argument(
        "--server-env", nargs="*", default=[], metavar="IMM_X=V", help="with --spawn: extra settings"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=200, help="measured requests per level (at most)")
    parser.add_argument("--max-seconds", type=float, default=60, help="time limit per level")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--image-size", default="1200x900")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e_latency.json")
    args = parser.parse_args(argv)

    width, height = (int(v) for v in args.image_size.lower().split("x"))
    photo = photo_jpeg(width, height)
    server = None
    if args.spawn:
        if not (args.ner_bundle / "manifest.json").is_file():
            parser.error(f"{args.ner_bundle} is not a bundle")
        server, url = spawn_server(args)
    else:
        url = args.url.rstrip("/")
    try:
        ready = httpx.get(f"{url}/ready", timeout=5).json()
        rows = []
        for workload, image in (
            (f"image {width}x{height} ({len(photo) // 1024} KiB)", photo),
            ("text only", None),
        ):
            for concurrency in args.concurrency:
                row = asyncio.run(
                    run_level(url, concurrency, image, args.requests, args.max_seconds, args.warmup)
                )
                row["workload"] = workload
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)

    header = f"{'workload':<30} {'conc':>4} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'req/s':>7} {'batch':>6} {'err':>4}"
    print(
        f"POST /ner on {ready['models']['ner'].get('name')} ({ready['models']['ner'].get('provider')}), {url}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['workload']:<30} {row['concurrency']:>4} {row['requests']:>5} {row['p50_ms']!s:>8} "
            f"{row['p99_ms']!s:>8} {row['mean_ms']!s:>8} {row['throughput_rps']!s:>7} "
            f"{row['mean_batch_size']!s:>6} {row['errors']:>4}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "url": url,
        "model": ready["models"]["ner"],
        "image_bytes": len(photo),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {
            "requests": args.requests,
            "max_seconds": args.max_seconds,
            "warmup": args.warmup,
            "server_env": args.server_env,
        },
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    return 1 if any(row["errors"] for row in rows) else 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
