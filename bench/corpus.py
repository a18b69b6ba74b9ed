"""Corpus extraction against the HTTP server, on the same rows and cores: ``imm extract`` rows/s
beside the server's best throughput under wrk (a C load generator), and ``imm extract --ray`` on a
local two-node Ray cluster by number of engine actors.

Workloads (the Twitter valid tweets, 1,723 rows): ``ner-text`` (weights/ner), ``ner-photo`` (every
row with the 1200x900 photo of bench/run.py; a bundle with a visual stream, default the
random-weight one bench/run.py builds), ``extract`` (weights/ner + weights/re, ``pairs=typed``).
Writes ``results.json`` and ``summary.md`` into ``--out``::

    python bench/corpus.py                         # all three, wrk at 16 and 64 connections
    python bench/corpus.py --workloads ner-text --ray-actors 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (str(ROOT), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import cpu_name, photo_jpeg, start_server  # noqa: E402
from run import ner_texts  # noqa: E402
from wrk import run_wrk  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
VISUAL = BENCH / "results" / "bundles" / "minilm-ner-int8"


def workload_models(name: str, root: Path) -> tuple[Path, dict[str, str]]:
    """A models directory (ner/, re/) for ``imm extract``, and the server's bundle settings."""
    models = root / f"models-{name}"
    models.mkdir()
    ner = VISUAL if name == "ner-photo" else ROOT / "weights" / "ner"
    (models / "ner").symlink_to(ner.resolve(), target_is_directory=True)
    (models / "re").symlink_to((ROOT / "weights" / "re").resolve(), target_is_directory=True)
    server = {"IMM_NER_BUNDLE": str(ner), "IMM_RE_BUNDLE": str(ROOT / "weights" / "re")}
    if name != "extract":
        server["IMM_RE_BUNDLE"] = ""
    return models, server


def extract_run(corpus: Path, models: Path, task: str, out: Path, images: Path | None, *more: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "imm.cli",
        "extract",
        str(corpus),
        "--out",
        str(out),
        "--models",
        str(models),
    ]
    command += ["--task", task, "--id-column", "id", *more]
    if images is not None:
        command += ["--images", str(images), "--image-column", "image"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMM_")} | {"RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(result.stdout[result.stdout.index("{") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["ner-text", "ner-photo", "extract"])
    parser.add_argument("--wrk-concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--wrk-seconds", type=float, default=15)
    parser.add_argument(
        "--ray-actors", type=int, nargs="*", default=[], help="also on a local 2-node Ray cluster"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "corpus")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    texts, source = ner_texts(DATA, limit=5000)
    photo = photo_jpeg(1200, 900)
    report: dict[str, Any] = {
        "machine": cpu_name(),
        "cores": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": len(texts),
        "texts": source,
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="imm-corpus-") as work:
        work = Path(work)
        pictures = work / "pictures"
        pictures.mkdir()
        (pictures / "photo.jpg").write_bytes(photo)
        for name in args.workloads:
            with_photo = name == "ner-photo"
            corpus = work / f"{name}.jsonl"
            corpus.write_text(
                "".join(
                    json.dumps({"id": f"r{i}", "text": t, **({"image": "photo.jpg"} if with_photo else {})})
                    + "\n"
                    for i, t in enumerate(texts)
                )
            )
            models, server_settings = workload_models(name, work)
            task = "extract" if name == "extract" else "ner"
            summary = extract_run(
                corpus, models, task, work / f"{name}.out.jsonl", pictures if with_photo else None
            )
            row: dict[str, Any] = {
                "imm_extract_rows_per_s": summary["rows_per_second"],
                "errors": summary["errors"],
            }
            server, url = start_server(
                server_settings | {"IMM_LOG_LEVEL": "warning"}, log_path=args.out / "server.log"
            )
            try:
                endpoint = "/extract" if name == "extract" else "/ner"
                fields = [{"text": t} for t in texts]
                requests = [(f, photo if with_photo else None) for f in fields[:500]]
                levels = {}
                for concurrency in args.wrk_concurrency:
                    run_wrk(url, endpoint, requests[:50], concurrency, 3)  # warm-up
                    time.sleep(1)
                    result = run_wrk(url, endpoint, requests, concurrency, args.wrk_seconds)
                    levels[concurrency] = result["throughput_rps"]
                row["server_wrk_requests_per_s"] = levels
                row["server_best_requests_per_s"] = max(levels.values())
                row["ratio"] = round(row["imm_extract_rows_per_s"] / row["server_best_requests_per_s"], 2)
            finally:
                server.terminate()
                server.wait(30)
            for actors in args.ray_actors:
                summary = ray_run(corpus, models, task, work, actors, pictures if with_photo else None)
                row.setdefault("ray_rows_per_s", {})[actors] = summary["rows_per_second"]
            report["workloads"][name] = row
            print(name, json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# imm extract against the server, {report['machine']} ({report['cores']} cores), {report['date']}",
        "",
        "| workload | imm extract rows/s | server best req/s (wrk) | ratio | Ray (2 local nodes), rows/s by actors |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in report["workloads"].items():
        ray_cell = ", ".join(f"{a}: {r}" for a, r in row.get("ray_rows_per_s", {}).items()) or "-"
        lines.append(
            f"| {name} | {row['imm_extract_rows_per_s']} | {row['server_best_requests_per_s']} | {row['ratio']} | {ray_cell} |"
        )
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def ray_run(corpus: Path, models: Path, task: str, work: Path, actors: int, images: Path | None) -> dict:
    """``imm extract --ray`` against a fresh local cluster of two one-CPU nodes."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    Path("/tmp/ray").mkdir(exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = work / f"ray-{actors}-{corpus.stem}.jsonl"
        return extract_run(
            corpus, models, task, out, images, "--ray", cluster.address, "--ray-actors", str(actors)
        )
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
