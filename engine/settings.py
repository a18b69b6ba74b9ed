"""Service configuration, read from ``IMM_*`` environment variables and a ``.env`` file in the working
directory (pydantic-settings; the environment wins).

Every knob has a safe default so that ``python -m service`` works on the default bundles, which ship
inside the package (``DEFAULT_WEIGHTS``). docs/service.md holds the table of variables; keep it in
step with this file.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.tasks import task_spec

#: Values of a bundle variable that switch that model off (its endpoint then answers 404).
DISABLED = {"", "none", "off", "disabled"}
#: The default bundles (``ner/``, ``re/``), package data of ``imm``: in a checkout ``imm/weights`` is a
#: link to ``weights/``, in an installed wheel a copy (docs/service.md, "The default models").
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "imm" / "weights"
#: The file of ``KEY=VALUE`` lines read after the environment (relative: the working directory).
ENV_FILE = ".env"
#: ``IMM_*`` variables that are not settings of this class but are read elsewhere: ``IMM_RAY_*``
#: (``service.ray_app.RaySettings``, which refuses unknown ones itself), the Docker health check's
#: timeout, docker-compose.yml's published port, and the test suite's.
OTHER_VARIABLES = {"IMM_HEALTHCHECK_TIMEOUT", "IMM_PUBLISHED_PORT", "IMM_DATA_DIR", "IMM_BASE_IMAGE"}
OTHER_PREFIXES = ("IMM_RAY_", "IMM_DOCKER_")


#: Where the cgroup file systems are mounted, and the file naming this process's cgroups.
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def available_cores() -> int:
    """The cores this process may use, not the machine's: its affinity mask (a container's CPU set,
    ``taskset``) and its cgroup's CPU quota (``docker --cpus``, a Kubernetes CPU limit), whichever is
    smaller. A quota is rounded down (at least 1): 1.5 CPUs run as 1 core, since two busy threads
    would be throttled for part of every period. The inference workers, ONNX Runtime's threads and
    the preprocessing threads follow from it (``engine.runtimes``; logged at start-up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, int(quota))
    return max(1, cores)


def cgroup_cpu_quota(root: Path | None = None, self_cgroup: Path | None = None) -> float | None:
    """The CPUs this process's cgroup quota allows: cgroup v2's ``cpu.max``, or v1's
    ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``, the tightest from its cgroup up to the root
    (its ancestors' quotas bind it too); None without a quota, or without cgroups."""
    root = root or CGROUP_ROOT
    try:
        lines = (self_cgroup or SELF_CGROUP).read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2: mounted at the root, or at unified/ (hybrid)
            bases, read = [root, root / "unified"], _v2_quota
        elif "cpu" in controllers.split(","):
            bases, read = [root / controllers, root / "cpu"], _v1_quota
        else:
            continue
        for base in bases:
            if base.is_dir():
                quotas += [q for d in _cgroup_dirs(base, path) if (q := read(d)) is not None]
                break
    return min(quotas, default=None)


def _cgroup_dirs(base: Path, path: str) -> list[Path]:
    """The cgroup's directory and its ancestors under ``base``; only ``base`` when the path is not
    there (a container sees its own cgroup as the root)."""
    directory = base / path.strip("/")
    if not directory.is_dir():
        return [base]
    return [directory, *[parent for parent in directory.parents if parent.is_relative_to(base)]]


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


class Settings(BaseSettings):
    """All the service's settings; ``Settings()`` reads the environment."""

    # IMM_* variables first, then a .env file in the working directory (KEY=VALUE lines, IMM_ names)
    model_config = SettingsConfigDict(env_prefix="IMM_", env_file=ENV_FILE, extra="ignore", frozen=True)

    ner_bundle: Path | None = Field(
        DEFAULT_WEIGHTS / "ner", description="NER bundle directory ('' disables /ner)"
    )
    re_bundle: Path | None = Field(
        DEFAULT_WEIGHTS / "re", description="RE bundle directory ('' disables /re)"
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    runtime: Literal["auto", "onnx", "torch"] = Field(
        "auto",
        description="what runs the models: 'onnx' (ONNX Runtime), 'torch' (PyTorch, the gpu extra: fp16 CUDA "
        "graphs, nvJPEG), or 'auto' (torch when PyTorch is installed and sees a CUDA device, else onnx)",
    )
    device: str = Field(
        "cuda",
        description="the PyTorch runtime's device ('cuda', 'cuda:1', or 'cpu' for fp32 without graphs)",
    )
    cuda_graphs: bool = Field(
        True, description="the PyTorch runtime captures CUDA graphs at start-up (off: eager fp16)"
    )
    providers: str = Field(
        "auto",
        description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', or a comma-separated list of "
        "ONNX Runtime execution providers (the onnx runtime)",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads inside one operator, per inference worker (0: the cores this process "
        "may use, its affinity and cgroup quota, shared among the workers, at least one each)",
    )
    inference_workers: int = Field(
        0,
        ge=0,
        description="runtime calls per model at once (0: 2 for ONNX Runtime on a CPU with 2 cores or more to use, "
        "else 1; the PyTorch runtime always runs one)",
    )
    inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads across operators")
    inference_nice: int = Field(
        -1,
        ge=-1,
        le=19,
        description="how many nice levels below the rest of the process the inference threads run (Linux), so "
        "that the event loop (health checks, refusals, answers) and preprocessing take a saturated core first "
        "(-1: 10 when the process may use one core, else 0)",
    )
    ort_spinning: bool = Field(
        False,
        description="let ONNX Runtime's threads busy-wait between runs (only for dedicated many-core machines)",
    )
    preprocess_threads: int = Field(
        0, ge=0, description="threads decoding images and tokenising (0: min(4, cores to use))"
    )
    max_batch_size: int = Field(16, ge=1, description="most requests run as one ONNX call")
    batch_wait_ms: float = Field(
        3.0, ge=0, description="how long a batch waits for more requests, when more are on their way"
    )
    max_queue: int = Field(
        256, ge=1, description="requests waiting per model; beyond it: 503 with Retry-After"
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request's deadline when the client sets none, and the cap of the one it sets "
        "(X-Request-Timeout): past it the request leaves the queue unanswered (504)",
    )
    queue_order: Literal["fifo", "adaptive"] = Field(
        "fifo",
        description="order of a model's queue: 'fifo', or 'adaptive' (newest first once the oldest request "
        "has waited IMM_LIFO_AFTER_MS: under overload, answer the callers still there)",
    )
    lifo_after_ms: float = Field(
        100.0, ge=0, description="with IMM_QUEUE_ORDER=adaptive, the wait after which newest go first"
    )
    overload_wait_ms: float = Field(
        100.0,
        ge=0,
        description="under sustained overload (a queue that has not emptied for IMM_OVERLOAD_AFTER_MS while "
        "callers gave up on it), "
        "the longest expected wait a request is admitted to (at least one model call's length; beyond: "
        "503 at once); 0: only the requests' deadlines bound the queue",
    )
    overload_after_ms: float = Field(
        1000.0,
        ge=0,
        description="how long the queue must stay non-empty before it counts as overloaded, and how long "
        "without a refusal for overload before that state ends",
    )
    retry_after_s: int = Field(
        1, ge=0, description="Retry-After of the 503 of a request still running when shutdown's grace ends"
    )
    workers: int = Field(
        0,
        ge=0,
        description="server processes on the one port (0: 1 with ONNX Runtime, 4 with the PyTorch runtime)",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="open connections per process; at the limit idle ones are closed to make room, and a "
        "new connection is answered 503 only when every other is busy with a request",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection that sends no complete request head within this is closed"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body not fully received within this (from its head) gets 408"
    )
    shutdown_grace_s: int = Field(
        10, ge=0, description="on SIGTERM, how long requests in flight may finish before the rest get 503"
    )
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        description="how long an idle client connection stays open; above a load balancer's idle timeout "
        "(60 s on common ones), so the server never closes a connection the balancer is about to reuse",
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest request body")
    max_uploads_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="request bodies being received at once per process, in bytes (from Content-Length; "
        "uploads over 1 MB are spooled to the temporary directory); beyond: 503 with Retry-After",
    )
    max_image_pixels: int = Field(
        25_000_000,
        ge=1,
        description="largest declared image (width x height); Twitter's own limit is 4096x4096",
    )
    max_text_chars: int = Field(25_000, ge=1, description="longest text accepted (longer: 413)")
    max_relation_pairs: int = Field(
        64,
        ge=1,
        description="most entity pairs one /extract classifies (8 entities make 56 ordered pairs; more: 413)",
    )
    api_key: SecretStr | None = Field(
        None, description="when set, /ner, /re and /extract need 'Authorization: Bearer <key>'"
    )
    warmup: bool = Field(True, description="run dummy batches before /ready says ready")
    ready_strict: bool = Field(
        False,
        description="/ready only when every configured model is ready (default: at least one is; a "
        "model switched off with an empty bundle variable never counts)",
    )
    log_level: str = Field("info", description="debug, info, warning or error (JSON lines on stderr)")

    @field_validator("ner_bundle", "re_bundle", mode="before")
    @classmethod
    def _disabled_is_none(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in DISABLED):
            return None
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("providers must not be empty")
        return value

    @property
    def preprocess_workers(self) -> int:
        return self.preprocess_threads or min(4, available_cores())

    @property
    def inference_nice_levels(self) -> int:
        """``inference_nice`` resolved: on one core the inference thread shares it with the event loop,
        which must not wait for the scheduler's slice; with more, the loop has a core of its own."""
        if self.inference_nice >= 0:
            return self.inference_nice
        return 10 if available_cores() == 1 else 0

    def bundle_path(self, task: str) -> Path | None:
        """The bundle directory of ``task`` (its ``TaskSpec.bundle_setting``), None when switched off."""
        return getattr(self, task_spec(task).bundle_setting)


def unknown_variables(
    environ: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = ENV_FILE
) -> list[str]:
    """One warning per ``IMM_*`` name of the environment or of ``env_file`` that no part of IMM reads
    (pydantic-settings ignores them: a misspelt ``IMM_MAX_BATCH_SZE`` would go unnoticed), naming the
    closest setting when one is close."""
    environ = os.environ if environ is None else environ
    sources = {name: "environment" for name in environ}
    if env_file is not None and Path(env_file).is_file():
        for name in dotenv_values(env_file):
            sources.setdefault(name, str(env_file))
    known = [f"IMM_{name.upper()}" for name in Settings.model_fields]
    warnings = []
    for name, source in sorted(sources.items()):
        upper = name.upper()  # pydantic-settings matches names regardless of case
        if not upper.startswith("IMM_") or upper in known or upper in OTHER_VARIABLES:
            continue
        if upper.startswith(OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "python -m service --help lists the settings"
        warnings.append(f"{name} ({source}) is not a setting and is ignored: {hint}")
    return warnings
