"""The engine's Prometheus metrics: per task (``ner``, ``re``, ``extract``) and per model, never per URL.

They live in a registry of their own (or the one a front end passes, so that its own metrics are
served beside them): several engines in one process (tests) never collide in the global one.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series double the output and say nothing a scraper needs.
disable_created_metrics()

# Latency buckets from 1 ms to 10 s: the stages span decode (sub-ms) to a full request under load.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class EngineMetrics:
    """What the engine counts and times: stages of each call, batches, queues, refusals, drops."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.stage_seconds = Histogram(
            "imm_stage_seconds",
            "Latency of each stage of a call (decode, tokenise, queue_wait, inference; total: the whole "
            "request as its front end saw it)",
            ["task", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "imm_batch_size",
            "Requests per runtime call",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "imm_queue_depth",
            "Requests waiting for a batch",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "imm_rejected",
            "Requests refused at once: the model's queue was full, or would not answer them by their deadline",
            ["model"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "imm_dropped",
            "Admitted requests that left before the model ran them: reason 'deadline' (their deadline "
            "passed or would pass first) or 'cancelled' (the caller went away: an HTTP client disconnected)",
            ["model", "reason"],
            registry=self.registry,
        )
        self.computed_rows = Counter(
            "imm_computed_rows", "Rows (examples) the model computed", ["model"], registry=self.registry
        )
        self.abandoned_rows = Counter(
            "imm_abandoned_rows",
            "Rows the model computed for callers that had gone when the batch ended",
            ["model"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "imm_model_info",
            "Loaded models (value 1), with their bundle name and execution provider",
            ["model", "name", "provider"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.runtime_info = Gauge(
            "imm_runtime_info",
            "The runtime that runs the models (value 1), and the CPU's matrix features (int8, bf16) it chose on",
            ["runtime", "cpu_features"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.ready = Gauge(
            "imm_ready",
            "1 when every available model is loaded and warmed up (in every worker process)",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        # The labelled series of each call's observations, kept rather than looked up per call
        # (``labels`` takes a lock and checks its values): a few tasks, stages and models in all.
        self._stage_series: dict[tuple[str, str], Any] = {}
        self._batch_series: dict[str, tuple[Any, Any]] = {}

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    def observe_batch(self, model: str, rows: int) -> None:
        series = self._batch_series.get(model)
        if series is None:
            series = self._batch_series[model] = (
                self.batch_size.labels(model),
                self.computed_rows.labels(model),
            )
        series[0].observe(rows)
        series[1].inc(rows)

    def observe_stages(self, task: str, stages: dict[str, float]) -> None:
        for stage, seconds in stages.items():
            series = self._stage_series.get((task, stage))
            if series is None:
                series = self._stage_series[task, stage] = self.stage_seconds.labels(task, stage)
            series.observe(seconds)
