"""The models an engine holds: loading a bundle, warming it up, its batcher and inference thread.

A model whose bundle is not configured, missing or broken is reported (in the log, in the
engine's status, and as ``ModelUnavailable`` for the requests that need it) while the other one
serves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from engine.batcher import Batcher
from engine.metrics import EngineMetrics
from engine.pipeline import Pipeline
from engine.runtimes import cpu_matrix_features, create_runtime, inference_workers, runtime_choice
from engine.settings import Settings
from export.bundle import load_bundle
from model.preprocessing import Preprocessor, load_tokenizer
from model.tasks import task_spec

log = logging.getLogger("service")


@dataclass
class ModelSlot:
    """One task's model and its state: 'loading', 'ready', 'absent' or 'failed'.

    ``configured`` is False when the settings switch the model off (an empty bundle variable):
    then it is absent on purpose, not missing.
    """

    task: str
    status: str = "loading"
    detail: str | None = None
    pipeline: Pipeline | None = None
    batcher: Batcher | None = None
    executor: ThreadPoolExecutor | None = None
    provider: str | None = None
    configured: bool = True

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def absent(self, detail: str, configured: bool = True) -> None:
        self.status, self.detail, self.configured = "absent", detail, configured

    def failed(self, detail: str) -> None:
        self.status, self.detail = "failed", detail

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)


def build_pipeline(task: str, path: Path, settings: Settings) -> Pipeline:
    """The task's pipeline on the bundle at ``path``, on the runtime ``settings`` choose."""
    bundle = load_bundle(path)
    preprocessor = Preprocessor(
        bundle.preprocessing, load_tokenizer(bundle.tokenizer_path), max_pixels=settings.max_image_pixels
    )
    runtime = create_runtime(bundle, preprocessor, settings)
    return task_spec(task).load("pipeline")(bundle, preprocessor, runtime)


def load_model(slot: ModelSlot, settings: Settings, metrics: EngineMetrics) -> float | None:
    """Loads (and warms up) ``slot``'s bundle into it, in the calling thread; the seconds loading took,
    or None when the slot ends absent or failed (it then says why)."""
    task = slot.task
    path = settings.bundle_path(task)
    if path is None:
        slot.absent(
            f"no {task.upper()} model configured ({task_spec(task).env_name} is empty)", configured=False
        )
        log.info("%s: its requests are refused", slot.detail)  # switched off on purpose
        return None
    if not path.exists():
        slot.absent(f"{task_spec(task).env_name}={path} does not exist")
        log.warning("%s: its requests are refused until restarted with a bundle there", slot.detail)
        return None
    started = time.perf_counter()
    try:
        pipeline = build_pipeline(task, path, settings)
        warmup_s = pipeline.warmup(settings.max_batch_size) if settings.warmup else 0.0
    except Exception as error:  # noqa: BLE001 - a broken bundle disables its model, not the engine
        slot.failed(f"the bundle at {path} could not be loaded: {type(error).__name__}: {error}")
        log.error("%s: its requests are refused", slot.detail, exc_info=not _expected(error))
        return None
    slot.pipeline = pipeline
    slot.provider = pipeline.runtime.provider
    workers = inference_workers(settings) if pipeline.runtime.concurrent_calls else 1
    slot.executor = ThreadPoolExecutor(
        workers,
        thread_name_prefix=f"imm-{task}-inference",
        initializer=lower_thread_priority,
        initargs=(settings.inference_nice_levels,),
    )
    slot.batcher = Batcher(
        pipeline.run_batch,
        slot.executor,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.batch_wait_ms / 1000,
        max_queue=settings.max_queue,
        order=settings.queue_order,
        lifo_after_s=settings.lifo_after_ms / 1000,
        workers=workers,
        overload_wait_s=settings.overload_wait_ms / 1000,
        overload_after_s=settings.overload_after_ms / 1000,
        on_batch=lambda rows, _seconds: metrics.observe_batch(task, rows),
        on_drop=lambda reason, rows: metrics.dropped.labels(task, reason).inc(),
        on_abandoned=lambda rows: metrics.abandoned_rows.labels(task).inc(rows),
        name=f"{task}-batcher",
    )
    runtime, why = runtime_choice(settings.runtime)
    metrics.runtime_info.labels(runtime, ",".join(cpu_matrix_features()) or "none known").set(1)
    log.info(
        "%s model %s loaded from %s in %.2f s (warm-up %.2f s), running on %s, %d call(s) at once; "
        "runtime %s (%s)",
        task.upper(),
        pipeline.name,
        path,
        time.perf_counter() - started,
        warmup_s,
        slot.provider,
        workers,
        runtime,
        why,
    )
    return time.perf_counter() - started


def lower_thread_priority(nice: int) -> None:
    """Lowers the calling thread's priority by ``nice`` levels (Linux keeps a nice value per thread).
    An inference thread runs calls of tens of milliseconds; lowered, it yields its core to the event
    loop (health checks, refusals, answers) and the preprocessing the moment they wake, instead of
    after the scheduler's slice. Lowering needs no privilege; where it fails, a warning says so."""
    if not nice:
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except (AttributeError, OSError) as error:  # not Linux, or a sandbox refusing it
        log.warning("the inference thread keeps its priority (nice +%d refused: %s)", nice, error)


def _expected(error: Exception) -> bool:
    """Errors whose message says it all (a bad bundle), logged without a traceback."""
    return isinstance(error, (ValueError, OSError, KeyError)) or type(error).__name__ == "BundleError"
