"""``make bench-ray``: /ner with a photo through Ray Serve (1 and 2 replicas) against ``python -m service``.

On this machine, in one run and with the same bundle and settings (``IMM_INTRA_OP_THREADS``: one
ONNX Runtime thread per server process or replica): ``python -m service`` on a free loopback port,
and a local two-node Ray cluster (``ray.cluster_utils.Cluster``, one CPU per node, as in
tests/test_ray_serve.py) with the IMM Serve application (``service/ray_app.py``) on one replica,
then on two (one per node). Every Serve level runs right after the same level on
``python -m service`` (up all along, idle in between), so that each pair is measured on the
machine in the same state: on a shared machine, compare within pairs.

Each is driven by an asyncio httpx client from this process, closed loop, with a new connection per
request (with Serve, the kernel spreads connections over the two nodes' proxies, and each proxy
prefers its own node's replica): POST /ner, a tweet and a 1200x900 photo-like JPEG, first one
request at a time (latency; Serve's overhead per request is the difference of the p50s), then at
``--concurrency`` (throughput). The share of the machine's CPUs busy during each level is reported
(it includes this client, the servers and whatever else runs: on a shared machine, say so).
Writes ``results.json`` and ``summary.md`` into ``--out`` (default ``bench/results/ray_serve``)::

    python bench/ray_serve.py                       # what `make bench-ray` runs, about 3 minutes
    python bench/ray_serve.py --seconds 5 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (str(ROOT), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import TWEETS, cpu_name, free_port, percentile, photo_jpeg, start_server  # noqa: E402
from run import machine_busy_s, server_timing  # noqa: E402

APP = "imm"


def process_tree_rss_mb(pid: int, exclude: int | None = None) -> dict[str, float]:
    """Resident memory (MB) of a process and its descendants but ``exclude``'s tree, by command name
    (Linux /proc; shared pages count in each process, so the sum is an upper bound)."""
    sizes: dict[str, float] = {}
    pending = [pid]
    while pending:
        current = pending.pop()
        if current == exclude:
            continue
        try:
            status = Path(f"/proc/{current}/status").read_text()
            name = Path(f"/proc/{current}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        rss_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        name = name.split("/")[-1] if not name.startswith("ray::") else name.split(".")[0]
        sizes[name] = round(sizes.get(name, 0.0) + rss_kb / 1024, 1)
    return sizes


async def level(url: str, photo: bytes, concurrency: int, seconds: float, warmup: int) -> dict[str, Any]:
    """``concurrency`` closed-loop clients for ``seconds``: latency percentiles, throughput, CPU busy."""
    # No keep-alive: every request opens its own connection (as through a load balancer to Serve).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        errors: Counter[str] = Counter()
        latencies: list[float] = []
        app_total: list[float] = []
        replicas: Counter[str] = Counter()
        sent = 0

        async def post(number: int, measured: bool) -> None:
            files = {"image": ("photo.jpg", photo, "image/jpeg")}
            started = time.perf_counter()
            try:
                answer = await client.post("/ner", data={"text": TWEETS[number % len(TWEETS)]}, files=files)
            except httpx.HTTPError as error:
                errors[type(error).__name__] += 1
                return
            elapsed = time.perf_counter() - started
            if answer.status_code != 200:
                errors[str(answer.status_code)] += 1
            elif measured:
                latencies.append(elapsed)
                app_total.append(server_timing(answer.headers.get("server-timing", "")).get("total", 0.0))
                replicas[answer.headers.get("x-serve-replica", "python -m service")] += 1

        await asyncio.gather(*(post(-1 - n, False) for n in range(max(warmup, concurrency))))
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < deadline:
                sent += 1
                await post(sent, True)

        busy_before = machine_busy_s()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        busy_after = machine_busy_s()
    ms = sorted(1000 * v for v in latencies)
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "ok": len(ms),
        "errors": dict(errors),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(ms) / wall, 2),
        "p50_ms": round(percentile(ms, 50), 2) if ms else None,
        "p90_ms": round(percentile(ms, 90), 2) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
        # The app's own time (Server-Timing "total": parsed form to answer), without HTTP and Serve.
        "app_total_p50_ms": round(percentile(sorted(app_total), 50), 2) if app_total else None,
        "requests_per_replica": dict(replicas),
    }
    if busy_before is not None and busy_after is not None:
        row["machine_cpu_busy_share"] = round((busy_after - busy_before) / (wall * (os.cpu_count() or 1)), 3)
    return row


def measure(name: str, url: str, photo: bytes, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    row = {"server": name, **asyncio.run(level(url, photo, concurrency, args.seconds, args.warmup))}
    print(
        f"{name:<24} c={concurrency:<3} {row['throughput_rps']:7.2f} req/s  p50 {row['p50_ms']} ms"
        f"  (app {row['app_total_p50_ms']} ms, CPUs busy {row.get('machine_cpu_busy_share')}, "
        f"errors {row['errors'] or 0})",
        flush=True,
    )
    return row


def serve_levels(
    settings: dict[str, str],
    single: tuple[int, str],
    photo: bytes,
    args: argparse.Namespace,
    memory: dict[str, Any],
) -> list[dict[str, Any]]:
    """The two-node cluster and the application on 1 then 2 replicas; each level is measured on
    ``python -m service`` (``single``: its pid and URL) right before, so that each pair shares the
    machine's state of that moment. The cluster is shut down at the end."""
    single_pid, single_url = single
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from engine.settings import Settings
    from service.ray_app import RaySettings, application

    os.environ.update(
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    Path("/tmp/ray").mkdir(exist_ok=True)  # Cluster() writes /tmp/ray/ray_current_cluster regardless
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    rows: list[dict[str, Any]] = []
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        print(f"two-node cluster and Serve up in {time.perf_counter() - started:.1f} s", flush=True)
        service_settings = Settings(**{k[4:].lower(): v for k, v in settings.items()})
        for replicas in (1, 2):
            started = time.perf_counter()
            ray_settings = RaySettings(min_replicas=replicas, max_replicas=replicas, cpus_per_replica=1)
            serve.run(application(service_settings, ray_settings), name=APP, route_prefix="/")
            states = serve.status().applications[APP].deployments["IMM"].replica_states
            print(
                f"{replicas} replica(s) running in {time.perf_counter() - started:.1f} s ({states})",
                flush=True,
            )
            name = f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}"
            memory[name] = process_tree_rss_mb(os.getpid(), exclude=single_pid)
            for concurrency in (1, args.concurrency):
                rows.append(
                    {"round": replicas, **measure("python -m service", single_url, photo, concurrency, args)}
                )
                rows.append(
                    {"round": replicas, **measure(name, f"http://127.0.0.1:{port}", photo, concurrency, args)}
                )
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Ray Serve against `python -m service`, {report['date']}, {report['cpu']} ({report['cores']} cores), "
        f"bundle `{report['bundle']}`, one ONNX Runtime thread per process or replica, /ner with a "
        f"{report['photo']} JPEG, a new connection per request, {report['seconds']:.0f} s per level; each "
        "Serve level right after the same level on `python -m service` (which stays up, idle, meanwhile).",
        "",
        "| server | clients | req/s | p50 ms | p90 ms | app p50 ms | CPUs busy | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['server']} | {row['concurrency']} | {row['throughput_rps']} | {row['p50_ms']} | "
            f"{row['p90_ms']} | {row['app_total_p50_ms']} | {row.get('machine_cpu_busy_share', '')} | "
            f"{sum(row['errors'].values())} |"
        )
    lines.append("")
    rows = report["rows"]
    for single, serve in zip(rows[::2], rows[1::2]):
        if single["concurrency"] == 1:
            lines.append(
                f"* {serve['server']}, one client: {serve['p50_ms'] - single['p50_ms']:+.1f} ms at p50 against "
                f"`python -m service` just before; time outside the app (p50 latency less the app's p50) "
                f"{serve['p50_ms'] - serve['app_total_p50_ms']:.1f} ms against "
                f"{single['p50_ms'] - single['app_total_p50_ms']:.1f} ms."
            )
        else:
            lines.append(
                f"* {serve['server']}, {serve['concurrency']} clients: {serve['throughput_rps']} req/s against "
                f"{single['throughput_rps']} ({serve['throughput_rps'] / single['throughput_rps']:.2f}x)."
            )
    lines.append(
        "\nResident memory (MB, by process name; this benchmark's own process included in the Ray rows):\n"
    )
    for name, sizes in report["memory_rss_mb"].items():
        detail = ", ".join(
            f"{process} {mb:.0f}" for process, mb in sorted(sizes.items(), key=lambda kv: -kv[1])
        )
        lines.append(f"* {name}: {sum(sizes.values()):.0f} in all ({detail})")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ner-bundle", type=Path, default=ROOT / "weights/ner")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the throughput level")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests before each level")
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=BENCH / "results/ray_serve")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.ner_bundle.exists():
        print(f"no NER bundle at {args.ner_bundle} (--ner-bundle)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    photo = photo_jpeg(1200, 900)
    settings = {
        "IMM_NER_BUNDLE": str(args.ner_bundle.resolve()),
        "IMM_RE_BUNDLE": "",
        "IMM_INTRA_OP_THREADS": str(args.intra_op_threads),
        "IMM_LOG_LEVEL": "warning",
    }
    load_before = os.getloadavg()
    server, url = start_server(settings, args.out / "server.log")
    memory: dict[str, Any] = {}
    try:
        memory["python -m service"] = process_tree_rss_mb(server.pid)
        rows = serve_levels(settings, (server.pid, url), photo, args, memory)
    finally:
        server.terminate()
        server.wait(30)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "bundle": str(args.ner_bundle),
        "photo": f"1200x900 ({len(photo) // 1000} kB)",
        "seconds": args.seconds,
        "load_average_before": load_before,
        "rows": rows,
        "memory_rss_mb": memory,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    summary = markdown(report)
    (args.out / "summary.md").write_text(summary)
    print("\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
