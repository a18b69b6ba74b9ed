"""``make bench``: end-to-end latency and throughput of the service under load, per stage, with plots.

Starts ``python -m service`` on a free loopback port (given bundles, threads and batching
settings), then drives it from this process (a separate one: the server is a subprocess) with an
asyncio httpx client, closed loop, at each concurrency, for four workloads:

    ner-photo   POST /ner, tweet + photo-like 1200x900 JPEG
    ner-small   POST /ner, tweet + 320x240 JPEG
    ner-text    POST /ner, tweet only
    re-image    POST /re, tweet + entity pair + 1200x900 JPEG

and, to price ``POST /extract`` (NER, then RE on every ordered pair of the entities found) against
``/ner`` alone on the same tweets, tweets in which the served NER model finds exactly 3 (6) entities,
so 6 (30) pairs (the 6-entity ones are not run by default: ``--scenarios ner-6 extract-6``)::

    ner-3       POST /ner, tweet with 3 entities       extract-3   POST /extract, the same tweets
    ner-6       POST /ner, tweet with 6 entities       extract-6   POST /extract, the same tweets

Every level is bounded in requests (``--requests``) and time (``--level-seconds``), and the whole
run by ``--deadline-s``: it stops by itself. Tweets come from ``../shared/data`` (Twitter-2017/2015
and MNRE valid files) when present, else from generated text; the tweets of the entity-count
workloads are tweets in which the server's NER model finds that many entities (asked before the
levels run: the dataset's tweets with that many gold entities, then generated ones). Per-stage
times (decode, tokenise, queue wait, inference, total) are the deltas of the server's own
Prometheus histograms over each level; the server's CPU time comes from /proc, and so does the
CPU time other processes took meanwhile (a shared machine shows there). Writes ``results.json``, ``summary.md`` and PNG plots
into ``--out`` (default ``bench/results/e2e``, git-ignored) and prints the summary::

    python bench/run.py                                  # what `make bench` runs
    python bench/run.py --quick                          # smoke test: 2 levels, few requests
    python bench/run.py --concurrency 1 16 --scenarios ner-photo ner-text --max-batch-size 32

A bundle that does not exist (the default ``weights/ner`` and ``weights/re`` before the default
models are trained) is replaced by a random-weight MiniLM-L6-sized bundle of ``--build-precision``
built with ``bench/make_bench_bundle.py`` (kept in ``bench/results/bundles`` for the next run);
the output says so. Latency is the trained model's; the answers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (str(ROOT), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import TWEETS, cpu_name, percentile, photo_jpeg, start_server  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
STAGES = ("decode", "tokenise", "queue_wait", "inference", "total")


@dataclass(frozen=True)
class Scenario:
    name: str
    endpoint: str  # "/ner", "/re" or "/extract"
    image: tuple[int, int] | None  # JPEG width x height, None for text only
    title: str
    entities: int | None = None  # only tweets in which the NER model finds this many entities

    @property
    def tasks(self) -> tuple[str, ...]:
        """The models the endpoint needs."""
        return ("ner", "re") if self.endpoint == "/extract" else (self.endpoint.strip("/"),)

    @property
    def batched_model(self) -> str:
        """The model whose batch sizes the level reports (/extract: RE, which gets its pairs)."""
        return self.tasks[-1]


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("ner-photo", "/ner", (1200, 900), "/ner + 1200x900 JPEG"),
        Scenario("ner-small", "/ner", (320, 240), "/ner + 320x240 JPEG"),
        Scenario("ner-text", "/ner", None, "/ner text only"),
        Scenario("re-image", "/re", (1200, 900), "/re + 1200x900 JPEG"),
        Scenario("ner-3", "/ner", None, "/ner, 3 entities", entities=3),
        Scenario("extract-3", "/extract", None, "/extract, 3 entities (6 pairs)", entities=3),
        Scenario("ner-6", "/ner", None, "/ner, 6 entities", entities=6),
        Scenario("extract-6", "/extract", None, "/extract, 6 entities (30 pairs)", entities=6),
    )
}
#: What ``make bench`` runs when no scenario is named (the 6-entity pair on request: 30 pairs a tweet).
DEFAULT_SCENARIOS = ("ner-photo", "ner-small", "ner-text", "re-image", "ner-3", "extract-3")


# -- inputs -------------------------------------------------------------------------------------
def ner_texts(data: Path, limit: int = 2000) -> tuple[list[str], str]:
    """Tweets (words joined by single spaces) from the Twitter valid files, else generated ones."""
    tweets, source = gold_tweets(data)
    if tweets:
        texts = [text for text, _ in tweets]
        random.Random(0).shuffle(texts)
        return texts[:limit], source
    return generated_tweets(limit), "generated"


def gold_tweets(data: Path) -> tuple[list[tuple[str, int]], str]:
    """(tweet, number of gold entities) of the Twitter valid files; none without the data."""
    from model.data import read_twitter_conll  # stdlib only

    tweets: list[tuple[str, int]] = []
    sources = []
    for name in ("twitter2017", "twitter2015"):
        path = data / name / "valid.txt"
        if path.is_file():
            tweets += [
                (" ".join(e.words), sum(t.startswith("B-") for t in e.tags)) for e in read_twitter_conll(path)
            ]
            sources.append(str(path))
    return tweets, ", ".join(sources)


def texts_with_entities(
    url: str, data: Path, count: int, want: int = 40, tries: int = 600
) -> tuple[list[str], str]:
    """Tweets in which the server's NER model finds exactly ``count`` entities: at most ``want`` of
    them, out of at most ``tries`` asked: first the dataset's tweets with ``count`` gold entities,
    then generated ones (built from entity-dense invented tweets: the valid files hold few tweets
    with 5 or more entities)."""
    tweets, source = gold_tweets(data)
    real = [text for text, gold in tweets if gold == count]
    random.Random(count).shuffle(real)
    generated = generated_tweets(2000)[len(TWEETS) :]
    random.Random(count).shuffle(generated)
    found: dict[str, list[str]] = {"real": [], "generated": []}
    with httpx.Client(base_url=url, timeout=60) as client:
        for kind, text in [*(("real", t) for t in real), *(("generated", t) for t in generated)][:tries]:
            answer = client.post("/ner", data={"text": text})
            if answer.status_code == 200 and len(answer.json()["entities"]) == count:
                found[kind].append(text)
                if len(found["real"]) + len(found["generated"]) >= want:
                    break
    note = (
        f"{len(found['real']) + len(found['generated'])} tweets in which the NER model finds {count} "
        f"entities ({len(found['real'])} of {source or 'no dataset'}, {len(found['generated'])} generated)"
    )
    return found["real"] + found["generated"], note


def generated_tweets(count: int) -> list[str]:
    """Tweet-like text: the invented tweets of common.py, cut and recombined."""
    rng = random.Random(0)
    words = [w for t in TWEETS for w in t.split()]
    texts = list(TWEETS)
    while len(texts) < count:
        texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 30))))
    return texts


def re_items(data: Path, limit: int = 2000) -> tuple[list[dict[str, Any]], str]:
    """MNRE valid pairs as /re form fields (character offsets into the space-joined words), else
    pairs of words of generated tweets."""
    from model.data import read_mnre
    from model.preprocessing import split_words

    path = data / "mnre" / "valid.txt"
    items = []
    if path.is_file():
        for example in read_mnre(path):
            starts, position = [], 0
            for word in example.words:
                starts.append(position)
                position += len(word) + 1
            text = " ".join(example.words)

            def span(words: tuple[int, int], starts=starts, example=example) -> tuple[int, int]:
                first, last = words
                return starts[first], starts[last - 1] + len(example.words[last - 1])

            (hs, he), (ts, te) = span(example.head), span(example.tail)
            nested = (hs <= ts and te <= he) or (ts <= hs and he <= te)
            if (hs, he) == (ts, te) or (max(hs, ts) < min(he, te) and not nested):
                continue  # the same span twice, or spans that cross (a 422; no MNRE pair is either)
            items.append(dict(text=text, head_start=hs, head_end=he, tail_start=ts, tail_end=te))
        random.Random(0).shuffle(items)
        return items[:limit], str(path)
    for text in generated_tweets(limit):
        words = split_words(text)
        if len(words) < 2:
            continue
        (_, hs, he), (_, ts, te) = words[0], words[-1]
        items.append(dict(text=text, head_start=hs, head_end=he, tail_start=ts, tail_end=te))
    return items, "generated"


# -- the server's metrics -----------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text format to {(name, labels): value}."""
    samples = {}
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found:
            labels = frozenset(_LABEL.findall(found.group(2) or ""))
            samples[(found.group(1), labels)] = float(found.group(3))
    return samples


def histogram_delta(before: dict, after: dict, name: str, **labels: str) -> dict[str, Any]:
    """count, sum and cumulative buckets [(le, count)] of a histogram between two scrapes."""
    wanted = set(labels.items())

    def delta(key: tuple[str, frozenset]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    buckets = []
    count = total = 0.0
    for key in after:
        sample_name, sample_labels = key
        rest = {k: v for k, v in sample_labels if (k, v) not in wanted}
        if not wanted <= sample_labels:
            continue
        if sample_name == f"{name}_bucket" and set(rest) == {"le"}:
            buckets.append((float(rest["le"]), delta(key)))
        elif sample_name == f"{name}_count" and not rest:
            count = delta(key)
        elif sample_name == f"{name}_sum" and not rest:
            total = delta(key)
    return {"count": count, "sum": total, "buckets": sorted(buckets)}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' estimate: linear interpolation inside the bucket holding the q-quantile."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def stage_breakdown(before: dict, after: dict, endpoint: str) -> dict[str, dict[str, float | None]]:
    stages = {}
    for stage in STAGES:
        h = histogram_delta(before, after, "imm_stage_seconds", task=endpoint.strip("/"), stage=stage)
        if not h["count"]:
            continue
        p50, p90 = (histogram_quantile(q, h["buckets"]) for q in (0.5, 0.9))
        stages[stage] = {
            "count": int(h["count"]),
            "mean_ms": round(1000 * h["sum"] / h["count"], 3),
            "p50_ms_est": None if p50 is None else round(1000 * p50, 2),
            "p90_ms_est": None if p90 is None else round(1000 * p90, 2),
        }
    return stages


def server_timing(header: str) -> dict[str, float]:
    """``decode;dur=1.20, inference;dur=30.5`` to {"decode": 1.2, "inference": 30.5} (ms)."""
    values = {}
    for entry in header.split(","):
        name, _, rest = entry.strip().partition(";")
        found = re.search(r"dur=([0-9.]+)", rest)
        if name and found:
            values[name] = float(found.group(1))
    return values


# -- CPU accounting (Linux /proc; None elsewhere) -----------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int | str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds of the server process and its children (the workers of IMM_WORKERS), all threads."""
    fields = _stat(pid)
    if fields is None:
        return None
    total = int(fields[11]) + int(fields[12])  # utime + stime
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            child = _stat(entry.name)
            if child is not None and child[1] == str(pid):  # field 4, ppid
                total += int(child[11]) + int(child[12])
    return total / _TICK


def machine_busy_s() -> float | None:
    """CPU seconds all processes spent (every core) since boot: /proc/stat less idle and iowait."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return None
    return (sum(values[:8]) - values[3] - values[4]) / _TICK


# -- one level ----------------------------------------------------------------------------------
class Load:
    """The requests of one scenario: form fields and the image, cycling over the inputs."""

    def __init__(self, scenario: Scenario, texts: list[str], pairs: list[dict], images: dict):
        """``texts``: the tweets of a /ner or /extract scenario; ``pairs``: /re's form fields."""
        self.scenario = scenario
        self.texts, self.pairs = texts, pairs
        self.image = images.get(scenario.image) if scenario.image else None

    def request(self, number: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self.scenario.endpoint == "/re":
            item = self.pairs[number % len(self.pairs)]
            data = {k: str(v) for k, v in item.items()}
        else:
            data = {"text": self.texts[number % len(self.texts)]}
        files = {"image": ("photo.jpg", self.image, "image/jpeg")} if self.image is not None else None
        return data, files


async def run_level(
    url: str,
    load: Load,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    warmup: int,
    server_pid: int | None,
    offset: int,
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    endpoint = load.scenario.endpoint
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        errors: Counter[str] = Counter()
        first_error: list[str] = []
        timings: dict[str, list[float]] = {}  # per-request stage ms from the Server-Timing header
        measuring = False

        async def post(number: int) -> float | None:
            data, files = load.request(offset + number)
            started = time.perf_counter()
            try:
                answer = await client.post(endpoint, data=data, files=files)
            except httpx.HTTPError as error:
                errors[type(error).__name__] += 1
                first_error.append(repr(error))
                return None
            elapsed = time.perf_counter() - started
            if answer.status_code != 200:
                errors[str(answer.status_code)] += 1
                first_error.append(f"HTTP {answer.status_code}: {answer.text[:200]}")
                return None
            if measuring:
                for name, ms in server_timing(answer.headers.get("server-timing", "")).items():
                    timings.setdefault(name, []).append(ms)
            return elapsed

        # Warm-up at this concurrency (opens the connections), not measured; bounded in time too.
        warm = max(warmup, concurrency)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(post(-1 - n) for n in range(warm))), max(5.0, max_seconds)
            )
        errors.clear()
        first_error.clear()

        before = parse_metrics((await client.get("/metrics")).text)
        cpu_server = process_cpu_s(server_pid) if server_pid else None
        cpu_machine, cpu_client = machine_busy_s(), time.process_time()
        latencies: list[float] = []
        next_number = 0
        measuring = True
        deadline = time.perf_counter() + max_seconds

        async def worker() -> None:
            nonlocal next_number
            while next_number < max_requests and time.perf_counter() < deadline:
                number = next_number
                next_number += 1
                elapsed = await post(number)
                if elapsed is not None:
                    latencies.append(elapsed)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu_client = time.process_time() - cpu_client
        cpu_machine_after = machine_busy_s()
        cpu_server_after = process_cpu_s(server_pid) if server_pid else None
        try:
            after = parse_metrics((await client.get("/metrics")).text)
        except httpx.HTTPError as error:  # the server went away: keep the client-side numbers
            first_error.append(f"/metrics after the level: {error!r}")
            after = before

    latencies.sort()
    ms = [1000 * v for v in latencies]
    sent = next_number
    batch = histogram_delta(before, after, "imm_batch_size", model=load.scenario.batched_model)
    row: dict[str, Any] = {
        "scenario": load.scenario.name,
        "endpoint": endpoint,
        "concurrency": concurrency,
        "sent": sent,
        "ok": len(ms),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "first_error": first_error[0] if first_error else None,
        "wall_s": round(wall, 3),
        "stopped_by": "requests" if sent >= max_requests else "time",
        "p50_ms": round(percentile(ms, 50), 2) if ms else None,
        "p90_ms": round(percentile(ms, 90), 2) if ms else None,
        "p99_ms": round(percentile(ms, 99), 2) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
        "max_ms": round(ms[-1], 2) if ms else None,
        "throughput_rps": round(len(ms) / wall, 2) if wall else None,
        "batches": int(batch["count"]),
        "mean_batch_size": round(batch["sum"] / batch["count"], 2) if batch["count"] else None,
        "stages": stage_breakdown(before, after, endpoint),
        # Exact per-request percentiles of the same stages, from the answers' Server-Timing header
        # ("total" there runs from the parsed form to the answer, without HTTP and multipart).
        "server_timing": {
            name: {f"p{q}_ms": round(percentile(sorted(values), q), 3) for q in (50, 90, 99)}
            for name, values in timings.items()
        },
        "client_cpu_ms_per_request": round(1000 * cpu_client / sent, 2) if sent else None,
    }
    if cpu_server is not None and cpu_server_after is not None and sent:
        row["server_cpu_ms_per_request"] = round(1000 * (cpu_server_after - cpu_server) / sent, 2)
    if cpu_machine is not None and cpu_machine_after is not None and wall:
        others = (cpu_machine_after - cpu_machine) - cpu_client
        if cpu_server is not None and cpu_server_after is not None:
            others -= cpu_server_after - cpu_server
        # Other processes' share of the machine's CPUs while this level ran (0 on an idle machine).
        row["other_processes_cpu_share"] = round(max(0.0, others) / (wall * (os.cpu_count() or 1)), 3)
    return row


def wait_until_idle(url: str, limit_s: float = 40.0) -> float:
    """Seconds until no request waits in the server's queues (``imm_queue_depth``), at most ``limit_s``."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        samples = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
        if sum(v for (name, _), v in samples.items() if name == "imm_queue_depth") == 0:
            break
        time.sleep(0.2)
    return time.perf_counter() - started


def run_wrk_level(
    url: str, load: Load, concurrency: int, seconds: float, server_pid: int | None, offset: int
) -> dict[str, Any]:
    """One level driven by wrk (``bench/wrk.py``): client-side numbers from wrk, stages and batch
    sizes from the server's metrics as in ``run_level``."""
    from wrk import run_wrk

    endpoint = load.scenario.endpoint
    requests = []
    for number in range(200):  # distinct tweets, each body written once
        data, files = load.request(offset + number)
        requests.append((data, files["image"][1] if files else None))
    run_wrk(url, endpoint, requests, concurrency, min(3.0, seconds))  # warm-up: opens the connections
    # wrk exits with its requests in flight, and the server still answers them (nobody reads the
    # answers): measuring before they are done would start the level with a full queue.
    wait_until_idle(url)
    before = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
    cpu_server = process_cpu_s(server_pid) if server_pid else None
    result = run_wrk(url, endpoint, requests, concurrency, seconds)
    cpu_server_after = process_cpu_s(server_pid) if server_pid else None
    after = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
    batch = histogram_delta(before, after, "imm_batch_size", model=load.scenario.batched_model)
    row: dict[str, Any] = {
        "scenario": load.scenario.name,
        "endpoint": endpoint,
        "concurrency": concurrency,
        **result,
        "stopped_by": "time",
        "batches": int(batch["count"]),
        "mean_batch_size": round(batch["sum"] / batch["count"], 2) if batch["count"] else None,
        "stages": stage_breakdown(before, after, endpoint),
    }
    if cpu_server is not None and cpu_server_after is not None and result["sent"]:
        row["server_cpu_ms_per_request"] = round(1000 * (cpu_server_after - cpu_server) / result["sent"], 2)
    return row


# -- bundles ------------------------------------------------------------------------------------
def bundle_summary(path: Path) -> dict[str, Any] | None:
    from export.bundle import BundleError, load_bundle  # torch-free

    try:
        bundle = load_bundle(path)
    except (BundleError, OSError):
        return None
    manifest = bundle.manifest
    source = manifest.get("source", {}).get("config", {}) or {}
    backbone = source.get("backbone_config", {}) or {}
    return {
        "path": str(path),
        "task": bundle.task,
        "name": bundle.name,
        "precision": manifest.get("precision"),
        "hidden_size": backbone.get("hidden_size"),
        "layers": backbone.get("num_hidden_layers"),
        "model_onnx_mb": round(bundle.model_path.stat().st_size / 1e6, 1),
        "visual_stream": bool(manifest.get("visual_stream", True)),
    }


def ensure_bundle(task: str, path: Path, args: argparse.Namespace) -> tuple[Path, str | None]:
    """``path`` when it holds a bundle, else a random-weight MiniLM-sized one (built once)."""
    if (path / "manifest.json").is_file():
        return path, None
    if args.no_build:
        raise SystemExit(f"{path} is not a bundle (and --no-build was given)")
    fallback = ROOT / "bench" / "results" / "bundles" / f"minilm-{task}-{args.build_precision}"
    note = (
        f"{path} does not exist: serving a random-weight MiniLM-L6-sized {args.build_precision} "
        f"{task.upper()} bundle ({fallback.relative_to(ROOT)}, made by bench/make_bench_bundle.py); "
        "its latency is a trained MiniLM model's, its answers mean nothing"
    )
    summary = bundle_summary(fallback)
    if summary is None or summary["precision"] != args.build_precision or summary["task"] != task:
        print(f"building {fallback.relative_to(ROOT)} (about a minute) ...", flush=True)
        started = time.perf_counter()
        command = [sys.executable, str(BENCH / "make_bench_bundle.py"), str(fallback)]
        command += ["--task", task, "--precision", args.build_precision]
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"building the bench bundle failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    print(f"NOTE: {note}", flush=True)
    return fallback, note


# -- summary ------------------------------------------------------------------------------------
def _find(rows: list[dict], scenario: str, concurrency: int) -> dict | None:
    return next((r for r in rows if r["scenario"] == scenario and r["concurrency"] == concurrency), None)


def check_targets(rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets for the 2-core machine (meaningful with the default int8 bundle)."""
    targets = []
    photo1, text1 = _find(rows, "ner-photo", 1), _find(rows, "ner-text", 1)
    if photo1 and photo1["p50_ms"] is not None:
        targets.append(
            {
                "target": "/ner + 1200x900 JPEG, p50 at concurrency 1 <= 25 ms",
                "value": f"{photo1['p50_ms']:.1f} ms",
                "met": photo1["p50_ms"] <= 25,
            }
        )
    if photo1 and text1 and photo1["p50_ms"] and text1["p50_ms"]:
        ratio = photo1["p50_ms"] / text1["p50_ms"]
        targets.append(
            {
                "target": "p50 with image <= 2.0 x text-only p50 (concurrency 1)",
                "value": f"{ratio:.2f}x",
                "met": ratio <= 2.0,
            }
        )
    for scenario in SCENARIOS:
        one, sixteen = _find(rows, scenario, 1), _find(rows, scenario, 16)
        if one and sixteen and one["throughput_rps"] and sixteen["throughput_rps"]:
            ratio = sixteen["throughput_rps"] / one["throughput_rps"]
            targets.append(
                {
                    "target": f"{scenario}: throughput at concurrency 16 >= 1.5 x concurrency 1",
                    "value": f"{ratio:.2f}x ({one['throughput_rps']:.1f} -> {sixteen['throughput_rps']:.1f} req/s)",
                    "met": ratio >= 1.5,
                }
            )
    return targets


def extract_costs(rows: list[dict]) -> list[dict[str, Any]]:
    """/extract against /ner alone on the same tweets, per entity count and concurrency."""
    costs = []
    for name, scenario in SCENARIOS.items():
        if scenario.endpoint != "/extract":
            continue
        for row in (r for r in rows if r["scenario"] == name):
            ner = _find(rows, f"ner-{scenario.entities}", row["concurrency"])
            if ner is None or not ner["p50_ms"] or not row["p50_ms"]:
                continue
            costs.append(
                {
                    "entities": scenario.entities,
                    "pairs": scenario.entities * (scenario.entities - 1),
                    "concurrency": row["concurrency"],
                    "ner_p50_ms": ner["p50_ms"],
                    "extract_p50_ms": row["p50_ms"],
                    "p50_ratio": round(row["p50_ms"] / ner["p50_ms"], 2),
                    "ner_rps": ner["throughput_rps"],
                    "extract_rps": row["throughput_rps"],
                    "ner_cpu_ms": ner.get("server_cpu_ms_per_request"),
                    "extract_cpu_ms": row.get("server_cpu_ms_per_request"),
                }
            )
    return costs


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    machine, rows = report["machine"], report["levels"]
    busy = [r["other_processes_cpu_share"] for r in rows if r.get("other_processes_cpu_share") is not None]
    lines = [
        f"# IMM service benchmark, {report['created']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; load average "
        f"{machine['load_average_before'][0]:.1f} before, {machine['load_average_after'][0]:.1f} after"
        + (
            f"; other processes used {100 * min(busy):.0f}-{100 * max(busy):.0f} % of the CPUs during the levels"
            if busy
            else ""
        )
        + ". The client runs on the same machine.",
    ]
    for task, bundle in report["bundles"].items():
        if bundle:
            lines.append(
                f"{task.upper()} bundle: {bundle['name']} ({bundle['precision']}, {bundle.get('hidden_size')} wide, "
                f"{bundle.get('layers')} layers, {bundle['model_onnx_mb']} MB)"
                + (
                    " - RANDOM WEIGHTS, built because the bundle was missing"
                    if bundle.get("fallback")
                    else ""
                )
                + (
                    " - TEXT-ONLY GRAPH: trained without pictures, so the server does not decode them"
                    " and the picture workloads measure the text path (see docs/benchmarks.md)"
                    if not bundle.get("visual_stream", True)
                    else ""
                )
            )
    settings = report["settings"]
    lines += [
        f"Server settings: {settings['server_env'] or 'defaults'}; per level at most {settings['requests']} "
        f"requests or {settings['level_seconds']:.0f} s after {settings['warmup']} (at least the concurrency) "
        f"warm-up requests. Inputs: {report['inputs']['ner_texts']} / {report['inputs']['re_pairs']}.",
        "",
        "| workload | conc | ok | err | p50 ms | p90 ms | p99 ms | req/s | batch | server CPU ms/req | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = r.get("other_processes_cpu_share")
        lines.append(
            f"| {SCENARIOS[r['scenario']].title} | {r['concurrency']} | {r['ok']} | {r['errors']} | "
            f"{_fmt(r['p50_ms'])} | {_fmt(r['p90_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['throughput_rps'])} | "
            f"{_fmt(r['mean_batch_size'], 2)} | {_fmt(r.get('server_cpu_ms_per_request'))} | "
            f"{'-' if share is None else f'{100 * share:.0f} %'} |"
        )
    lines += [
        "",
        "Server stages, mean ms per request (from `imm_stage_seconds`; `inference` is the whole batch call: "
        "collate, ONNX Runtime, CRF decoding; `other` = total - the stages: HTTP, multipart parsing, "
        "thread hand-offs, the answer; `client` = client latency - server total):",
        "",
        "| workload | conc | decode | tokenise | queue wait | inference | other | server total | client |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = {k: v["mean_ms"] for k, v in r["stages"].items()}
        if "total" not in s:
            continue
        known = sum(s.get(k, 0.0) for k in ("decode", "tokenise", "queue_wait", "inference"))
        client = r["mean_ms"] - s["total"] if r["mean_ms"] is not None else None
        lines.append(
            f"| {SCENARIOS[r['scenario']].title} | {r['concurrency']} | {_fmt(s.get('decode'), 2)} | "
            f"{_fmt(s.get('tokenise'), 2)} | {_fmt(s.get('queue_wait'))} | {_fmt(s.get('inference'))} | "
            f"{_fmt(s['total'] - known)} | {_fmt(s['total'])} | {_fmt(client)} |"
        )
    if report.get("extract_costs"):
        lines += [
            "",
            "/extract (entities, then the relation of every ordered pair) against /ner alone, same tweets:",
            "",
            "| entities | pairs | conc | /ner p50 ms | /extract p50 ms | ratio | /ner req/s | /extract req/s "
            "| /ner CPU ms/req | /extract CPU ms/req |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in report["extract_costs"]:
            lines.append(
                f"| {c['entities']} | {c['pairs']} | {c['concurrency']} | {_fmt(c['ner_p50_ms'])} | "
                f"{_fmt(c['extract_p50_ms'])} | {c['p50_ratio']:.2f}x | {_fmt(c['ner_rps'])} | "
                f"{_fmt(c['extract_rps'])} | {_fmt(c['ner_cpu_ms'])} | {_fmt(c['extract_cpu_ms'])} |"
            )
    if report["targets"]:
        lines += ["", "Targets (2-core machine, default int8 bundle):", ""]
        lines += [
            f"- {'MET ' if t['met'] else 'MISSED'} {t['target']}: {t['value']}" for t in report["targets"]
        ]
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    if report.get("plots"):
        lines += ["", "Plots: " + ", ".join(Path(p).name for p in report["plots"])]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="drive a server already running instead of starting one")
    parser.add_argument("--ner-bundle", type=Path, default=ROOT / "weights" / "ner")
    parser.add_argument("--re-bundle", type=Path, default=ROOT / "weights" / "re")
    parser.add_argument("--build-precision", default="int8", choices=("fp32", "int8", "int8-weight-only"))
    parser.add_argument("--no-build", action="store_true", help="a missing bundle is an error")
    parser.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument(
        "--load-generator",
        choices=("python", "wrk"),
        default="python",
        help="python: this process's httpx client (exact per-request stage timings); wrk: the C load "
        "generator (bench/wrk.py), for throughput at high concurrency without stealing the server's CPU",
    )
    parser.add_argument("--requests", type=int, default=200, help="measured requests per level, at most")
    parser.add_argument("--level-seconds", type=float, default=25, help="measured seconds per level, at most")
    parser.add_argument(
        "--warmup", type=int, default=5, help="warm-up requests per level (at least the concurrency)"
    )
    parser.add_argument(
        "--deadline-s", type=float, default=540, help="the whole run, start-up included, ends within this"
    )
    group = parser.add_argument_group("server settings (default: the service's defaults)")
    group.add_argument("--intra-op-threads", type=int, help="IMM_INTRA_OP_THREADS")
    group.add_argument("--preprocess-threads", type=int, help="IMM_PREPROCESS_THREADS")
    group.add_argument("--max-batch-size", type=int, help="IMM_MAX_BATCH_SIZE")
    group.add_argument("--batch-wait-ms", type=float, help="IMM_BATCH_WAIT_MS")
    group.add_argument("--server-env", nargs="*", default=[], metavar="IMM_X=V", help="any other setting")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (tweets)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: concurrency 1 and 4, 10 requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.level_seconds, args.warmup = [1, 4], 10, 10, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_started = time.monotonic()
    scenarios = [SCENARIOS[name] for name in args.scenarios]
    tasks = sorted({task for s in scenarios for task in s.tasks})
    notes: list[str] = []

    server_env: dict[str, str] = {}
    for flag, variable in (
        ("intra_op_threads", "IMM_INTRA_OP_THREADS"),
        ("preprocess_threads", "IMM_PREPROCESS_THREADS"),
        ("max_batch_size", "IMM_MAX_BATCH_SIZE"),
        ("batch_wait_ms", "IMM_BATCH_WAIT_MS"),
    ):
        if getattr(args, flag) is not None:
            server_env[variable] = str(getattr(args, flag))
    for assignment in args.server_env:
        key, _, value = assignment.partition("=")
        server_env[key] = value

    bundles: dict[str, dict | None] = {}
    server = None
    args.out.mkdir(parents=True, exist_ok=True)
    if args.url:
        url = args.url.rstrip("/")
    else:
        paths = {}
        for task in ("ner", "re"):
            requested = args.ner_bundle if task == "ner" else args.re_bundle
            if task not in tasks:
                paths[task] = None
                continue
            path, note = ensure_bundle(task, requested if requested.is_absolute() else ROOT / requested, args)
            paths[task] = path
            bundles[task] = bundle_summary(path)
            if note:
                notes.append(note)
                if bundles[task]:
                    bundles[task]["fallback"] = True
        settings = {
            "IMM_NER_BUNDLE": str(paths["ner"] or ""),
            "IMM_RE_BUNDLE": str(paths["re"] or ""),
            **server_env,
        }
        log_path = args.out / "server.log"
        log_path.unlink(missing_ok=True)
        started = time.perf_counter()
        server, url = start_server(settings, log_path)
        print(f"server ready in {time.perf_counter() - started:.1f} s on {url} (log: {log_path})", flush=True)
    ready = httpx.get(f"{url}/ready", timeout=10).json()

    texts, text_source = ner_texts(args.data)
    pairs, pair_source = re_items(args.data)
    by_entities: dict[int, list[str]] = {}
    for count in sorted({s.entities for s in scenarios if s.entities is not None}):
        if ready["models"].get("ner", {}).get("status") == "ready":
            by_entities[count], source = texts_with_entities(url, args.data, count)
            text_source += f"; {source}"
            print(source, flush=True)
    images = {s.image: photo_jpeg(*s.image) for s in scenarios if s.image}
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    levels = [(s, c) for s in scenarios for c in args.concurrency]
    try:
        for index, (scenario, concurrency) in enumerate(levels):
            missing = [t for t in scenario.tasks if ready["models"].get(t, {}).get("status") != "ready"]
            if missing:
                print(f"skipping {scenario.name}: the {missing[0].upper()} model is not ready", flush=True)
                continue
            scenario_texts = texts if scenario.entities is None else by_entities.get(scenario.entities)
            if not scenario_texts:
                notes.append(
                    f"{scenario.name}: no tweet in which the NER model finds {scenario.entities} entities"
                )
                print(notes[-1], flush=True)
                continue
            # Share what is left of the deadline (less 10 s for the plots) among the levels still to
            # run; a fifth of a share goes to the level's warm-up.
            left = args.deadline_s - (time.monotonic() - run_started) - 10
            if left < 2:
                notes.append(
                    f"deadline reached: {scenario.name} at concurrency {concurrency} and later not run"
                )
                print(notes[-1], flush=True)
                break
            seconds = max(1.0, min(args.level_seconds, 0.8 * left / (len(levels) - index)))
            if server is not None and server.poll() is not None:
                notes.append(
                    f"the server exited (status {server.returncode}) before {scenario.name} at concurrency "
                    f"{concurrency}: stopped there (see server.log; a SIGTERM from outside shows as 'Shutting down')"
                )
                print(notes[-1], flush=True)
                break
            load = Load(scenario, scenario_texts, pairs, images)
            pid = server.pid if server else None
            if args.load_generator == "wrk":
                row = run_wrk_level(url, load, concurrency, seconds, pid, offset=997 * index)
            else:
                row = asyncio.run(
                    run_level(
                        url, load, concurrency, args.requests, seconds, args.warmup, pid, offset=997 * index
                    )
                )
            rows.append(row)
            print(
                f"{scenario.name:<10} c={concurrency:<3} ok={row['ok']:<4} err={row['errors']:<3} "
                f"p50={_fmt(row['p50_ms'])} p90={_fmt(row['p90_ms'])} p99={_fmt(row['p99_ms'])} ms "
                f"{_fmt(row['throughput_rps'])} req/s batch={_fmt(row['mean_batch_size'], 2)}",
                flush=True,
            )
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    load_after = os.getloadavg()

    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "url": url,
        "ready": ready,
        "bundles": bundles,
        "settings": {
            "server_env": server_env,
            "requests": args.requests,
            "level_seconds": args.level_seconds,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "load_generator": args.load_generator,
        },
        "inputs": {
            "ner_texts": f"{len(texts)} tweets from {text_source}",
            "re_pairs": f"{len(pairs)} pairs from {pair_source}",
            "images": {f"{w}x{h}": len(data) for (w, h), data in images.items()},
        },
        "levels": rows,
        "targets": check_targets(rows),
        "extract_costs": extract_costs(rows),
        "notes": notes,
    }
    if not args.no_plots and rows:
        try:
            from plots import plot_e2e

            report["plots"] = [str(p) for p in plot_e2e(report, args.out)]
        except ImportError as error:
            notes.append(f"no plots: {error}")
    summary = markdown(report)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / "summary.md").write_text(summary + "\n", encoding="utf-8")
    print()
    print(summary)
    print(
        f"\nwritten {args.out / 'results.json'}, {args.out / 'summary.md'} "
        f"({time.monotonic() - run_started:.0f} s in all)"
    )
    return 1 if not rows or any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
