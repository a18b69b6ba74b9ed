"""Overload benchmark: does the service keep answering past its capacity, as impatient users retry?

Starts ``python -m service`` (NER model only) on a free loopback port and drives it from this
process with a light raw-socket HTTP/1.1 client (keep-alive connections, requests built once), in
phases, for one workload (``--workload text``: ``POST /ner`` with a tweet; ``photo``: with a
1200x900 JPEG as well):

1. **baseline**: one client, back to back (``--baseline-requests``): the normal latency.
2. **capacity**: ``--capacity-clients`` clients back to back (16, then 64) for ``--capacity-seconds``
   each: the most answers per second of them is the capacity.
3. **overload**, for each ``--multipliers`` m: users arrive at random (Poisson) at m x capacity for
   ``--seconds``. Each user waits at most ``--patience`` seconds per attempt (then closes its
   connection) and retries at once after a timeout or a 503, up to ``--retries`` times. With
   ``--send-deadline`` each attempt says so (``X-Request-Timeout: PATIENCE``). While it runs, a
   probe sends the head of a 5 MB upload now and then (``Expect: 100-continue``, the body held
   back) and times its answer: refused before the body (503), or admitted (the probe then gives up).
   Meanwhile ``GET /health`` every 100 ms on a connection of its own (2-s limit) times the
   server's liveness answer under the load.
4. **recovery**, right after each overload phase: one request every 50 ms until 3 in a row are
   back within 2x the baseline p50 (+5 ms): the seconds that took.

``--server-cpus 0 --client-cpus 1`` pins the server and this load generator to CPUs of their own
(affinity masks), so the load generator cannot take the server's core: the server then runs as a
1-CPU container would, sized from its mask. Without them both share the machine's CPUs.

It reports per phase the goodput (answers received within the patience, per second, and as a share
of capacity), the p50/p99 of the answers received, the rows the model computed and how many of
them were for users who had already left (``imm_abandoned_rows_total``), requests dropped from the
queue before the model (deadline, cancelled) and refused at once, and the recovery time. Bounded:
every phase has a fixed length, the whole run ``--deadline-s``. Loopback only. Writes
``results.json`` and ``summary.md`` into ``--out`` (default ``bench/results/overload``)::

    python bench/overload.py                              # text, 2x and 4x, 30 s each
    python bench/overload.py --workload photo --ner-bundle bench/results/bundles/minilm-ner-int8
    python bench/overload.py --no-send-deadline --queue-order adaptive
    python bench/overload.py --server-cpus 0 --client-cpus 1   # the server on one core of its own
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (str(ROOT), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import cpu_name, percentile, photo_jpeg, start_server  # noqa: E402
from run import ner_texts  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
BOUNDARY = "imm-overload-boundary"


# -- a light HTTP/1.1 client ---------------------------------------------------------------------------
def ner_request(text: str, photo: bytes | None, timeout_s: float | None) -> bytes:
    """The bytes of one ``POST /ner`` (multipart), built once per tweet."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="text"\r\n\r\n{text}\r\n'.encode()]
    if photo is not None:
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
            + photo
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    deadline = f"X-Request-Timeout: {timeout_s:g}\r\n" if timeout_s is not None else ""
    head = (
        f"POST /ner HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n{deadline}\r\n"
    )
    return head.encode() + body


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """Sends ``request``; (status, whether the server keeps the connection)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, keep = 0, True
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
        await self.reader.readexactly(length)
        return status, keep

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Idle keep-alive connections to the server, reused by the next attempt."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list[Connection] = []
        self.opened = 0

    async def get(self) -> Connection:
        if self.idle:
            return self.idle.pop()
        self.opened += 1
        return Connection(*await asyncio.open_connection(self.host, self.port, limit=1 << 20))

    def put(self, connection: Connection) -> None:
        self.idle.append(connection)

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


async def attempt(pool: Pool, request: bytes, timeout_s: float) -> tuple[str, float]:
    """One try: ('ok' | '503' | 'timeout' | 'error' | 'status NNN', seconds)."""
    started = time.perf_counter()
    connection = None
    try:
        connection = await asyncio.wait_for(pool.get(), timeout_s)
        status, keep = await asyncio.wait_for(
            connection.exchange(request), max(0.001, timeout_s - (time.perf_counter() - started))
        )
    except asyncio.TimeoutError:
        if connection is not None:
            connection.close()  # the user leaves: the server sees the disconnect
        return "timeout", time.perf_counter() - started
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        if connection is not None:
            connection.close()
        return "error", time.perf_counter() - started
    (pool.put if keep else lambda c: c.close())(connection)
    outcome = "ok" if status == 200 else "503" if status == 503 else f"status {status}"
    return outcome, time.perf_counter() - started


# -- phases ------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    answered_s: list[float] = field(default_factory=list)  # latency of each 200 received
    users: int = 0
    users_served: int = 0
    users_gave_up: int = 0


async def closed_loop(
    pool: Pool, requests: list[bytes], clients: int, seconds: float, patience: float
) -> Tally:
    tally = Tally()
    stop = time.perf_counter() + seconds

    async def client(n: int) -> None:
        k = n
        while time.perf_counter() < stop:
            outcome, elapsed = await attempt(pool, requests[k % len(requests)], patience)
            k += clients
            tally.outcomes[outcome] += 1
            if outcome == "ok":
                tally.answered_s.append(elapsed)

    await asyncio.gather(*(client(n) for n in range(clients)))
    return tally


async def open_loop(
    pool: Pool, requests: list[bytes], rate: float, seconds: float, patience: float, retries: int
) -> Tally:
    """Users arriving at ``rate`` per second (Poisson) for ``seconds``; each as described above."""
    tally = Tally()
    rng = random.Random(7)
    users: list[asyncio.Task] = []

    async def user(k: int) -> None:
        tally.users += 1
        for _ in range(1 + retries):
            outcome, elapsed = await attempt(pool, requests[k % len(requests)], patience)
            tally.outcomes[outcome] += 1
            if outcome == "ok":
                tally.answered_s.append(elapsed)
                tally.users_served += 1
                return
        tally.users_gave_up += 1

    started = time.perf_counter()
    next_arrival, k = started, 0
    while next_arrival < started + seconds:
        delay = next_arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        users.append(asyncio.create_task(user(k)))
        k += 1
        next_arrival += rng.expovariate(rate)
    await asyncio.gather(*users)
    return tally


async def upload_probe(
    host: str, port: int, stop_at: float, every_s: float, patience: float
) -> list[float | None]:
    """Heads of 5 MB uploads (body held back behind Expect: 100-continue) every ``every_s``: seconds
    to the 503 for each, or None when the server admitted it (it then waits for the body)."""
    results: list[float | None] = []
    head = (
        f"POST /ner HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {5 * 1024 * 1024}\r\nExpect: 100-continue\r\nX-Request-Timeout: {patience:g}\r\n\r\n"
    ).encode()
    while time.perf_counter() < stop_at:
        await asyncio.sleep(every_s)
        reader, writer = await asyncio.open_connection(host, port)
        started = time.perf_counter()
        writer.write(head)
        try:
            line = await asyncio.wait_for(reader.readline(), 1.0)
            results.append(time.perf_counter() - started if b" 503 " in line else None)
        except asyncio.TimeoutError:
            results.append(None)
        finally:
            writer.close()
    return results


async def health_probe(host: str, port: int, stop_at: float, every_s: float = 0.1) -> list[float | None]:
    """``GET /health`` every ``every_s`` on a connection of its own: seconds to each answer, None for
    one that failed or took more than 2 s (the connection is then opened again)."""
    pool, results = Pool(host, port), []
    request = b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n"
    while time.perf_counter() < stop_at:
        await asyncio.sleep(every_s)
        outcome, elapsed = await attempt(pool, request, 2.0)
        results.append(elapsed if outcome == "ok" else None)
    pool.close()
    return results


async def recovery(pool: Pool, request: bytes, normal_s: float, limit_s: float = 30.0) -> float | None:
    """Seconds until 3 requests in a row (one every 50 ms) answer within ``normal_s``; None if never."""
    started = time.perf_counter()
    in_row = 0
    while time.perf_counter() - started < limit_s:
        outcome, elapsed = await attempt(pool, request, 5.0)
        in_row = in_row + 1 if outcome == "ok" and elapsed <= normal_s else 0
        if in_row == 3:
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    return None


# -- server metrics ---------------------------------------------------------------------------------------
async def scrape(pool: Pool) -> str:
    connection = await pool.get()
    connection.writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
    head = await connection.reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))
    body = await connection.reader.readexactly(length)
    pool.put(connection)
    return body.decode()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for found in re.finditer(re.escape(name) + r"\{([^}]*)\} ([0-9.e+-]+)", text):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if all(pairs.get(k) == v for k, v in labels.items()):
            total += float(found.group(2))
    return total


COUNTERS = {
    "computed_rows": ("imm_computed_rows_total", {"model": "ner"}),
    "abandoned_rows": ("imm_abandoned_rows_total", {"model": "ner"}),
    "dropped_deadline": ("imm_dropped_total", {"model": "ner", "reason": "deadline"}),
    "dropped_cancelled": ("imm_dropped_total", {"model": "ner", "reason": "cancelled"}),
    "rejected": ("imm_rejected_total", {"model": "ner"}),
}


STAGES = ("decode", "tokenise", "queue_wait", "inference", "total")


def counter_deltas(before: str, after: str) -> dict[str, Any]:
    """The phase's counters, and the mean of each stage the server measured (ms; "total" is from the
    request's head to its answer, for every /ner answer, refusals included)."""
    deltas: dict[str, Any] = {
        key: metric(after, name, **labels) - metric(before, name, **labels)
        for key, (name, labels) in COUNTERS.items()
    }
    means = {}
    for stage in STAGES:
        labels = {"task": "ner", "stage": stage}
        count = metric(after, "imm_stage_seconds_count", **labels) - metric(
            before, "imm_stage_seconds_count", **labels
        )
        seconds = metric(after, "imm_stage_seconds_sum", **labels) - metric(
            before, "imm_stage_seconds_sum", **labels
        )
        means[stage] = round(seconds / count * 1000, 1) if count else None
    deltas["stage_mean_ms"] = means
    return deltas


async def drained(pool: Pool, limit_s: float = 60.0) -> None:
    """Waits until the server's NER queue is empty (the previous phase's requests are gone)."""
    stop = time.perf_counter() + limit_s
    while time.perf_counter() < stop:
        if metric(await scrape(pool), "imm_queue_depth", model="ner") == 0:
            return
        await asyncio.sleep(0.2)


def summary_of(tally: Tally, seconds: float, capacity: float | None = None) -> dict[str, Any]:
    answered = sorted(tally.answered_s)
    goodput = len(answered) / seconds
    result: dict[str, Any] = {
        "goodput_per_s": round(goodput, 1),
        "attempts": sum(tally.outcomes.values()),
        "outcomes": dict(tally.outcomes),
        "answered_p50_ms": round(percentile(answered, 50) * 1000, 1) if answered else None,
        "answered_p99_ms": round(percentile(answered, 99) * 1000, 1) if answered else None,
    }
    if capacity:
        result["goodput_share"] = round(goodput / capacity, 3)
    if tally.users:
        result |= {
            "users": tally.users,
            "users_served": tally.users_served,
            "users_gave_up": tally.users_gave_up,
        }
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = {
        "IMM_NER_BUNDLE": str(args.ner_bundle),
        "IMM_RE_BUNDLE": "",
        "IMM_QUEUE_ORDER": args.queue_order,
        "IMM_LOG_LEVEL": "warning",
        **dict(setting.split("=", 1) for setting in args.set),
    }
    server, url = start_server(settings, log_path=args.out / "server.log", cpus=args.server_cpus)
    host, port = url.removeprefix("http://").split(":")
    pool = Pool(host, int(port))
    texts, source = ner_texts(DATA, limit=500)
    photo = photo_jpeg(1200, 900) if args.workload == "photo" else None
    timeout = args.patience if args.send_deadline else None
    requests = [ner_request(t, photo, timeout) for t in texts]
    plain = [ner_request(t, photo, None) for t in texts]
    report: dict[str, Any] = {
        "machine": cpu_name(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "workload": args.workload,
        "texts": source,
        "settings": settings,
        "patience_s": args.patience,
        "retries": args.retries,
        "send_deadline": args.send_deadline,
        "server_cpus": sorted(args.server_cpus) if args.server_cpus else "all (shared)",
        "client_cpus": sorted(args.client_cpus) if args.client_cpus else "all (shared)",
        "phases": {},
    }
    try:
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        baseline = await closed_loop(pool, plain, 1, args.baseline_seconds, 10.0)
        normal = percentile(sorted(baseline.answered_s), 50)
        report["phases"]["baseline"] = summary_of(baseline, args.baseline_seconds)
        capacity = 0.0
        for clients in args.capacity_clients:
            await drained(pool)
            before = await scrape(pool)
            tally = await closed_loop(pool, plain, clients, args.capacity_seconds, 10.0)
            answers_per_s = len(tally.answered_s) / args.capacity_seconds
            capacity = max(capacity, answers_per_s)
            report["phases"][f"capacity c{clients}"] = summary_of(
                tally, args.capacity_seconds
            ) | counter_deltas(before, await scrape(pool))
            print(f"{clients} clients back to back: {answers_per_s:.1f} answers/s", flush=True)
        report["capacity_per_s"] = round(capacity, 1)
        print(f"baseline p50 {normal * 1000:.1f} ms; capacity {capacity:.1f} answers/s", flush=True)
        for multiplier in args.multipliers:
            await drained(pool)
            await asyncio.sleep(1.0)
            rate = multiplier * capacity
            before = await scrape(pool)
            probe = asyncio.create_task(
                upload_probe(host, int(port), time.perf_counter() + args.seconds - 1, 2.0, args.patience)
            )
            health = asyncio.create_task(health_probe(host, int(port), time.perf_counter() + args.seconds))
            tally = await open_loop(pool, requests, rate, args.seconds, args.patience, args.retries)
            back = await recovery(pool, plain[0], 2 * normal + 0.005)
            probes = await probe
            healths = await health
            health_s = sorted(h for h in healths if h is not None)
            after = await scrape(pool)
            refused = sorted(p for p in probes if p is not None)
            phase = summary_of(tally, args.seconds, capacity) | counter_deltas(before, after)
            computed = phase["computed_rows"]
            phase |= {
                "offered_users_per_s": round(rate, 1),
                "abandoned_share": round(phase["abandoned_rows"] / computed, 4) if computed else None,
                # From the moment the last user finished (the load stopped) to normal latency.
                "recovered_after_s": None if back is None else round(back, 2),
                "upload_probes": len(probes),
                "upload_refused_early": len(refused),
                "upload_503_p50_ms": round(percentile(refused, 50) * 1000, 2) if refused else None,
                "upload_503_max_ms": round(refused[-1] * 1000, 2) if refused else None,
                "health_probes": len(healths),
                "health_missed": healths.count(None),
                "health_p50_ms": round(percentile(health_s, 50) * 1000, 1) if health_s else None,
                "health_p99_ms": round(percentile(health_s, 99) * 1000, 1) if health_s else None,
            }
            report["phases"][f"{multiplier:g}x"] = phase
            print(f"{multiplier:g}x: {json.dumps(phase)}", flush=True)
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        report["client_cpu_s"] = round(
            cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime, 1
        )
        report["connections_opened"] = pool.opened
    finally:
        pool.close()
        server.terminate()
        server.wait(30)
    return report


def write_summary(report: dict[str, Any], out: Path) -> str:
    lines = [
        f"# Overload: /ner {report['workload']}, users patient {report['patience_s']:g} s, "
        f"{report['retries']} retries, deadline header {'sent' if report['send_deadline'] else 'not sent'}",
        "",
        f"{report['machine']}; {report['date']}; queue order {report['settings']['IMM_QUEUE_ORDER']}; "
        f"server CPUs {report['server_cpus']}, client CPUs {report['client_cpus']}; "
        f"client CPU {report.get('client_cpu_s')} s",
        "",
        "| phase | offered users/s | goodput/s | share of capacity | p50 ms | p99 ms | computed rows | "
        "abandoned | dropped (deadline / cancelled) | refused at once | recovered after s | 5 MB upload 503 max ms "
        "| /health p99 ms (missed) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, phase in report["phases"].items():
        lines.append(
            f"| {name} | {phase.get('offered_users_per_s', '')} | {phase['goodput_per_s']} | "
            f"{phase.get('goodput_share', '')} | {phase['answered_p50_ms']} | {phase['answered_p99_ms']} | "
            f"{phase.get('computed_rows', '')} | {phase.get('abandoned_rows', '')} | "
            f"{phase.get('dropped_deadline', '')} / {phase.get('dropped_cancelled', '')} | "
            f"{phase.get('rejected', '')} | {phase.get('recovered_after_s', '')} | "
            f"{phase.get('upload_503_max_ms', '')} | "
            + (f"{phase['health_p99_ms']} ({phase['health_missed']}) |" if "health_probes" in phase else " |")
        )
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def cpu_list(text: str) -> set[int]:
    """``0``, ``0-1``, ``0,2-3``: a set of CPU numbers (taskset's list format)."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CPU list such as 0, 0-1 or 0,2") from None
    if not cpus:
        raise argparse.ArgumentTypeError(f"{text!r} names no CPU")
    return cpus


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ner-bundle", type=Path, default=ROOT / "weights" / "ner")
    parser.add_argument("--workload", choices=("text", "photo"), default="text")
    parser.add_argument("--multipliers", type=float, nargs="*", default=[2.0, 4.0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each overload phase")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--capacity-clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    parser.add_argument("--patience", type=float, default=1.0, help="seconds a user waits per attempt")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--send-deadline", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--queue-order", choices=("fifo", "adaptive"), default="fifo")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="IMM_NAME=VALUE",
        help="more server settings, such as IMM_INTRA_OP_THREADS=1",
    )
    parser.add_argument(
        "--server-cpus", type=cpu_list, default=None, help="CPUs of the server (as taskset: 0, 0-1, 0,2)"
    )
    parser.add_argument("--client-cpus", type=cpu_list, default=None, help="CPUs of this load generator")
    parser.add_argument("--deadline-s", type=float, default=900.0, help="the whole run stops by then")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "overload")
    args = parser.parse_args()
    if any("=" not in setting or not setting.startswith("IMM_") for setting in args.set):
        parser.error("--set takes IMM_NAME=VALUE pairs")
    if not (args.ner_bundle / "manifest.json").is_file():
        parser.error(f"--ner-bundle {args.ner_bundle}: no bundle there (manifest.json missing)")
    usable = os.sched_getaffinity(0)
    for option, cpus in (("--server-cpus", args.server_cpus), ("--client-cpus", args.client_cpus)):
        if cpus and not cpus <= usable:
            parser.error(
                f"{option}: CPUs {sorted(cpus - usable)} are not among this machine's {sorted(usable)}"
            )
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop  # the client's own cost shares the machine with the server: keep it low

        uvloop.install()
    except ImportError:
        pass
    try:
        report = asyncio.run(asyncio.wait_for(run(args), args.deadline_s))
    except asyncio.TimeoutError:
        print(f"stopped: the run passed --deadline-s {args.deadline_s:g}", file=sys.stderr)
        return 1
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(write_summary(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
