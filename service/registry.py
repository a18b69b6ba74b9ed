"""The models the service holds: loading bundles, warming them up, their batchers and threads.

Loading runs in the background after start-up, so /health answers at once and /ready tells when
the models are warm. A model whose bundle is not configured, missing or broken is reported (in
the log at start-up, in /ready, and as a 503 on its endpoint) while the other one serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from export.bundle import load_bundle
from model.preprocessing import Preprocessor, load_tokenizer
from service.batcher import Batcher
from service.observability import Metrics
from service.pipeline import PIPELINES, Pipeline
from service.runtime import create_runtime
from service.settings import Settings

log = logging.getLogger("service")

TASKS = ("ner", "re")
ENV_NAMES = {"ner": "IMM_NER_BUNDLE", "re": "IMM_RE_BUNDLE"}


@dataclass
class ModelSlot:
    """One task's model and its state: 'loading', 'ready', 'absent' or 'failed'."""

    task: str
    status: str = "loading"
    detail: str | None = None
    pipeline: Pipeline | None = None
    batcher: Batcher | None = None
    executor: ThreadPoolExecutor | None = None
    provider: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"


@dataclass
class ServiceState:
    """Everything the app holds between requests."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    slots: dict[str, ModelSlot] = field(default_factory=lambda: {task: ModelSlot(task) for task in TASKS})
    loaded: threading.Event = field(default_factory=threading.Event)  # set when loading has finished
    preprocess_pool: ThreadPoolExecutor | None = None
    _loader: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.preprocess_pool = ThreadPoolExecutor(
            self.settings.preprocess_workers, thread_name_prefix="imm-preprocess"
        )
        self._loader = asyncio.get_running_loop().create_task(self.load_all(), name="imm-loader")

    async def stop(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loader
        for slot in self.slots.values():
            if slot.batcher is not None:
                await slot.batcher.stop()
            if slot.executor is not None:
                slot.executor.shutdown(wait=False, cancel_futures=True)
        if self.preprocess_pool is not None:
            self.preprocess_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def is_ready(self) -> bool:
        """Loading finished and at least one model is warm."""
        return self.loaded.is_set() and any(slot.ready for slot in self.slots.values())

    # -- loading ---------------------------------------------------------------------------
    async def load_all(self) -> None:
        try:
            for task in TASKS:
                await self._load(task)
        finally:
            self.loaded.set()
            self.metrics.ready.set(1 if self.is_ready else 0)
            states = ", ".join(f"{t}: {s.status}" for t, s in self.slots.items())
            (log.info if self.is_ready else log.error)(
                "loading finished (%s); ready: %s", states, self.is_ready
            )

    async def _load(self, task: str) -> None:
        slot = self.slots[task]
        path = self.settings.bundle_path(task)
        endpoint = f"/{task}"
        if path is None:
            slot.status, slot.detail = (
                "absent",
                f"no {task.upper()} model configured ({ENV_NAMES[task]} is empty)",
            )
            log.warning("%s: %s answers 503", slot.detail, endpoint)
            return
        if not path.exists():
            slot.status = "absent"
            slot.detail = f"{ENV_NAMES[task]}={path} does not exist"
            log.warning(
                "%s: %s answers 503 until the service is restarted with a bundle there", slot.detail, endpoint
            )
            return
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            pipeline = await loop.run_in_executor(None, self._build, task, path)
            warmup_s = 0.0
            if self.settings.warmup:
                warmup_s = await loop.run_in_executor(None, pipeline.warmup, self.settings.max_batch_size)
        except Exception as error:  # noqa: BLE001 - a broken bundle disables its endpoint, not the service
            slot.status = "failed"
            slot.detail = f"the bundle at {path} could not be loaded: {type(error).__name__}: {error}"
            log.error("%s: %s answers 503", slot.detail, endpoint, exc_info=not _expected(error))
            return
        slot.pipeline = pipeline
        slot.provider = pipeline.runtime.provider
        slot.executor = ThreadPoolExecutor(1, thread_name_prefix=f"imm-{task}-inference")
        metrics = self.metrics
        slot.batcher = Batcher(
            pipeline.run_batch,
            slot.executor,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.batch_wait_ms / 1000,
            max_queue=self.settings.max_queue,
            on_batch=lambda size, _seconds: metrics.batch_size.labels(task).observe(size),
            name=f"{task}-batcher",
        )
        slot.batcher.start()
        slot.status, slot.detail = "ready", None
        self.metrics.model_info.labels(task, pipeline.name, slot.provider).set(1)
        log.info(
            "%s model %s loaded from %s in %.2f s (warm-up %.2f s), running on %s",
            task.upper(),
            pipeline.name,
            path,
            time.perf_counter() - started,
            warmup_s,
            slot.provider,
        )

    def _build(self, task: str, path: Path) -> Pipeline:
        bundle = load_bundle(path)
        preprocessor = Preprocessor(
            bundle.preprocessing,
            load_tokenizer(bundle.tokenizer_path),
            max_pixels=self.settings.max_image_pixels,
        )
        runtime = create_runtime(bundle, preprocessor, self.settings)
        return PIPELINES[task](bundle, preprocessor, runtime)


def _expected(error: Exception) -> bool:
    """Errors whose message says it all (a bad bundle), logged without a traceback."""
    return isinstance(error, (ValueError, OSError, KeyError)) or type(error).__name__ == "BundleError"
