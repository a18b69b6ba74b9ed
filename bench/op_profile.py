"""Where a bundle's model call spends its time, per op type: ONNX Runtime's own profiler, one thread.

The graph alone (no tokenisation, no CRF), on the batch ``bench/model_latency.py`` times (random
vocabulary words of exactly ``--seq-len`` pieces, pictures on ``--image-fraction`` of the rows)::

    python bench/op_profile.py weights/ner --batch-sizes 1 16
    python bench/op_profile.py bench/results/bundles/minilm-ner-int8 --batch-sizes 1 16 --image-fraction 1

Prints, per batch size, the nodes ONNX Runtime runs after its own graph optimisations (how many,
and of which types) and each op type's share of the kernel time, averaged over ``--runs`` calls.

``--vs GRAPH ...`` instead times the bundle's graph against other graphs with the same inputs (an
export variant), one thread each, in interleaved rounds on the same batch, and prints each one's
median CPU milliseconds per call, its spread over the rounds and its ratio to the bundle's graph::

    python bench/op_profile.py weights/ner --vs /tmp/new/model.onnx --batch-sizes 1 16 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))


def profile(model_path: Path, feeds: dict, runs: int, warmup: int = 5) -> dict:
    """Per op type: kernel microseconds per call and node count, from ONNX Runtime's profiler."""
    import onnxruntime as ort

    from export.bundle import session_options

    with tempfile.TemporaryDirectory(prefix="imm-op-profile-") as work:
        options = session_options(intra_op_threads=1)
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        warm = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            warm.run(None, feeds)
        import onnx

        optimized = onnx.load(options.optimized_model_filepath)
        nodes = Counter(node.op_type for node in optimized.graph.node)
        options = session_options(intra_op_threads=1)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(work) / "profile")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_type: dict[str, float] = defaultdict(float)
    calls = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    timed = calls[warmup:]
    start = timed[0]["ts"] if timed else 0
    total_call = sum(e["dur"] for e in timed) / max(len(timed), 1)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < start:
            continue
        per_type[event["args"]["op_name"]] += event["dur"] / runs
    return {"nodes": dict(nodes), "kernel_us": dict(per_type), "call_us": total_call}


def compare(graphs: list[Path], feeds: dict, runs: int, rounds: int) -> dict[str, list[float]]:
    """Median CPU ms per call of each graph in each of ``rounds`` interleaved rounds of ``runs`` calls."""
    import onnxruntime as ort

    from export.bundle import session_options

    sessions = {
        str(graph): ort.InferenceSession(str(graph), session_options(1), providers=["CPUExecutionProvider"])
        for graph in graphs
    }
    for session in sessions.values():
        for _ in range(5):
            session.run(None, feeds)
    medians: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(runs):  # call by call, A B A B ...: a change in the machine's load hits all alike
            for name, session in sessions.items():
                started = time.process_time()
                session.run(None, feeds)
                times[name].append((time.process_time() - started) * 1000)
        for name, values in times.items():
            medians[name].append(statistics.median(values))
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="bundle directory")
    parser.add_argument(
        "--model", type=Path, help="another graph with the bundle's inputs (default: its model.onnx)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--seq-len", type=int, default=36, help="pieces per example, [CLS] and [SEP] included"
    )
    parser.add_argument("--image-fraction", type=float, default=0.0)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--vs", type=Path, nargs="+", help="time these graphs against the bundle's instead")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of --runs calls (--vs)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from model_latency import benchmark_batch

    from export.bundle import load_bundle
    from export.onnx_export import INPUT_NAMES
    from model.preprocessing import Preprocessor, load_tokenizer

    bundle = load_bundle(args.bundle)
    preprocessor = Preprocessor(bundle.preprocessing, load_tokenizer(bundle.tokenizer_path))
    report: dict = {}
    for batch_size in args.batch_sizes:
        batch = benchmark_batch(preprocessor, bundle.task, batch_size, args.seq_len, args.image_fraction)
        feeds = {name: batch[name] for name in INPUT_NAMES[bundle.task]}
        if args.vs:
            graphs = [args.model or bundle.model_path, *args.vs]
            report[batch_size] = compare(graphs, feeds, args.runs, args.rounds)
            print(
                f"\nbatch {batch_size}, {args.seq_len} pieces, {args.image_fraction:.0%} with picture, 1 thread:"
            )
            print("| graph | CPU ms per call (median of rounds) | min-max over rounds | vs the first |")
            print("|---|---:|---:|---:|")
            for name, rounds in report[batch_size].items():
                ratio = [mine / base for mine, base in zip(rounds, report[batch_size][str(graphs[0])])]
                print(
                    f"| {name} | {statistics.median(rounds):.3f} | {min(rounds):.3f}-{max(rounds):.3f} | "
                    f"{statistics.median(ratio):.3f} ({min(ratio):.3f}-{max(ratio):.3f}) |"
                )
            continue
        result = profile(args.model or bundle.model_path, feeds, args.runs)
        report[batch_size] = result
        kernel = sum(result["kernel_us"].values())
        print(
            f"\n{args.model or bundle.model_path}, batch {batch_size}, {args.seq_len} pieces, "
            f"{args.image_fraction:.0%} with picture: {sum(result['nodes'].values())} nodes after ORT's "
            f"optimisations; call {result['call_us'] / 1000:.2f} ms, kernels {kernel / 1000:.2f} ms\n"
        )
        print("| op | nodes | us per call | share |\n|---|---:|---:|---:|")
        for op, us in sorted(result["kernel_us"].items(), key=lambda item: -item[1]):
            print(f"| {op} | {result['nodes'].get(op, '')} | {us:.0f} | {us / kernel:.1%} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
