"""Metrics, request ids and the one log line per request.

Every answer carries ``X-Request-ID`` (the client's, when it sent a sane one, else a new one);
the same id is in the request's log line and in the body of a 500. Metrics live in a registry of
their own per app, so several apps (tests) never collide in the global one. With several worker
processes (``IMM_WORKERS``, ``PROMETHEUS_MULTIPROC_DIR`` set) prometheus-client keeps each
process's values in files and ``Metrics.exposition`` adds them up: counters and histograms sum,
the queue depth sums over live processes, readiness is the least ready process's.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import json_error_body

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_HEADER_BYTES = REQUEST_ID_HEADER.encode()
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

access_log = logging.getLogger("service.access")
error_log = logging.getLogger("service.errors")

# The *_created series double the output and say nothing a scraper needs.
disable_created_metrics()

STAGES = ("decode", "tokenise", "queue_wait", "inference", "total")
#: The endpoints that run a model (guarded by the API key; their stages are measured).
INFERENCE_ENDPOINTS = ("/ner", "/re", "/extract")
# Latency buckets from 1 ms to 10 s: the stages span decode (sub-ms) to a full request under load.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """The service's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "imm_requests", "HTTP requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.stage_seconds = Histogram(
            "imm_stage_seconds",
            "Latency of each stage of a request (decode, tokenise, queue_wait, inference, total)",
            ["endpoint", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "imm_batch_size",
            "Requests per ONNX Runtime call",
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
        self.ready = Gauge(
            "imm_ready",
            "1 when every available model is loaded and warmed up (in every worker process)",
            registry=self.registry,
            multiprocess_mode="livemin",
        )

    def exposition(self) -> bytes:
        """The text /metrics serves: this process's registry, or every worker's when there are several."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def process_exiting(self) -> None:
        """Drops this process's live gauges from the multiprocess files (a clean worker exit)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.mark_process_dead(os.getpid())

    def observe_batch(self, model: str, rows: int) -> None:
        self.batch_size.labels(model).observe(rows)
        self.computed_rows.labels(model).inc(rows)

    def observe_stages(self, endpoint: str, stages: dict[str, float]) -> None:
        for stage, seconds in stages.items():
            self.stage_seconds.labels(endpoint, stage).observe(seconds)


# Fresh ids: this process's random prefix and a counter, unique across processes and restarts
# without a uuid4 (an os.urandom call) per request.
_ID_PREFIX = os.urandom(8).hex()
_ids = itertools.count()


def _new_id_prefix() -> None:  # a forked worker must not repeat its parent's ids
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_id_prefix)


def new_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` when it is short and plain (it ends up in logs), else a fresh one."""
    for name, value in headers:
        if name.lower() == _REQUEST_ID_HEADER_BYTES:
            candidate = value.decode("latin-1")
            if _SANE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return f"{_ID_PREFIX}{next(_ids):016x}"


class RequestContextMiddleware:
    """Outermost ASGI layer: request id, total latency, request counter, access log, last-resort 500.

    An exception that escapes the app is logged with its traceback (server side only) and answered
    with a generic JSON 500 naming the request id: no answer ever carries a stack trace.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: Iterable[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = frozenset(endpoints)

    def _endpoint(self, path: str) -> str:
        # Known routes only, so that random paths cannot blow up the label set.
        return path if path in self.endpoints else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = new_request_id(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - last resort: log it, answer a generic 500
            error_log.exception(
                "unhandled error in request %s %s [%s]", scope["method"], scope["path"], request_id
            )
            status = 500
            if not response_started:
                body = json_error_body("internal server error", request_id)
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - started
            endpoint = self._endpoint(scope["path"])
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if endpoint in INFERENCE_ENDPOINTS:
                self.metrics.stage_seconds.labels(endpoint, "total").observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):  # the line's JSON costs more than the check
                client = scope.get("client")
                access_log.info(
                    json.dumps(
                        {
                            "request_id": request_id,
                            "method": scope["method"],
                            "path": scope["path"],
                            "status": status,
                            "ms": round(elapsed * 1000, 2),
                            "client": client[0] if client else None,
                            **scope["state"].get("log_extra", {}),
                        },
                        ensure_ascii=False,
                    )
                )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (tracebacks as a field)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        if record.name == access_log.name and message.startswith("{"):
            try:
                entry.update(json.loads(message))
            except ValueError:
                entry["message"] = message
        else:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def logging_config(level: str) -> dict:
    """A ``logging.config.dictConfig`` for the server and uvicorn: JSON lines on stderr."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }
