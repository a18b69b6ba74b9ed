"""Metrics, request ids and the one log line per request.

Every answer carries ``X-Request-ID`` (the client's, when it sent a sane one, else a new one);
the same id is in the request's log line and in the body of a 500. Metrics live in a registry of
their own per app, so several apps (tests) never collide in the global one. With several worker
processes (``IMM_WORKERS``, ``PROMETHEUS_MULTIPROC_DIR`` set) prometheus-client keeps each
process's values in files and ``Metrics.exposition`` adds them up: counters and histograms sum,
the queue depth sums over live processes, readiness is the least ready process's. The files are
mapped into memory: ``reserve_multiprocess_files`` allocates a process's files before its first
metric (a page that a full disk cannot back would kill the process with SIGBUS), and
``remove_dead_processes`` drops the live gauges of a worker that was killed (SIGKILL, OOM) before
it could drop them itself.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, multiprocess, values
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.metrics import EngineMetrics
from model.logs import JsonFormatter
from model.tasks import TASKS
from service.context import request_context
from service.errors import send_json_error

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_HEADER_BYTES = REQUEST_ID_HEADER.encode()
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

access_log = logging.getLogger("service.access")
error_log = logging.getLogger("service.errors")

#: The endpoints that run a model (guarded by the API key; their stages are measured), by task.
INFERENCE_ENDPOINTS = {**{spec.route: spec.name for spec in TASKS.values()}, "/extract": "extract"}

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The files one process writes in multiprocess mode (prometheus-client names them
#: ``<type>[_<gauge mode>]_<pid>.db``): one per metric type and gauge mode that ``Metrics`` uses.
MULTIPROCESS_FILES = ("counter", "histogram", "gauge_livesum", "gauge_livemax", "gauge_livemin")
#: Bytes allocated up front for each of them: prometheus-client grows a file (sparse) beyond its
#: size, so this is ample for the service's bounded label sets (the histograms take ~70 KB).
MULTIPROCESS_FILE_BYTES = 256 * 1024


class Metrics(EngineMetrics):
    """The service's Prometheus metrics: the engine's, plus the HTTP server's own (requests by path,
    connections), in one registry of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = Counter(
            "imm_requests", "HTTP requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.open_connections = Gauge(
            "imm_open_connections",
            "Open client connections (IMM_MAX_CONNECTIONS per process)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.connections_dropped = Counter(
            "imm_connections_dropped",
            "Client connections the server closed or refused for its limits: 'idle_evicted' (idle, closed "
            "to make room at IMM_MAX_CONNECTIONS), 'idle_pressure' (idle past the keep-alive timeout "
            "shortened near the limit), 'refused' (503 at the limit, none idle), 'head_timeout' (no "
            "complete request head within IMM_HEADER_TIMEOUT_S)",
            ["reason"],
            registry=self.registry,
        )
        # Counted on every refusal (thousands a second under overload): their labelled series are
        # kept rather than looked up again each time (``labels`` takes a lock and checks its values).
        for metric in (self.requests, self.stage_seconds, self.rejected):
            metric.labels = functools.lru_cache(maxsize=256)(metric.labels)  # type: ignore[method-assign]
        global _current
        _current = self

    def exposition(self) -> bytes:
        """The text /metrics serves: this process's registry, or every worker's when there are several."""
        directory = os.environ.get(MULTIPROCESS_ENV)
        if directory:
            remove_dead_processes(directory)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def process_exiting(self) -> None:
        """Drops this process's live gauges from the multiprocess files (a clean worker exit)."""
        if os.environ.get(MULTIPROCESS_ENV):
            multiprocess.mark_process_dead(os.getpid())


#: The last ``Metrics`` made in this process: the app's, where the server's connection events go.
_current: Metrics | None = None


def connection_opened() -> None:
    if _current is not None:
        _current.open_connections.inc()


def connection_closed() -> None:
    if _current is not None:
        _current.open_connections.dec()


def connection_dropped(reason: str) -> None:
    if _current is not None:
        _current.connections_dropped.labels(reason).inc()


def reserve_multiprocess_files(directory: str | os.PathLike, pid: int) -> None:
    """Creates the multiprocess files of process ``pid`` at ``MULTIPROCESS_FILE_BYTES`` each, their
    blocks allocated, before the process makes its first metric: prometheus-client maps them into
    memory, and a write to a page that a full disk cannot back kills the process (SIGBUS) where
    this raises ``OSError`` (ENOSPC, EROFS, ...). The files are removed again when it fails."""
    created: list[Path] = []
    try:
        for prefix in MULTIPROCESS_FILES:
            path = Path(directory) / f"{prefix}_{pid}.db"
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            created.append(path)
            try:
                if os.fstat(descriptor).st_size < MULTIPROCESS_FILE_BYTES:
                    _allocate(descriptor, MULTIPROCESS_FILE_BYTES)
            finally:
                os.close(descriptor)
    except OSError:
        for path in created:
            path.unlink(missing_ok=True)
        raise


def _allocate(descriptor: int, size: int) -> None:
    """Allocates the first ``size`` bytes of a file (zeros), extending it: ``posix_fallocate`` where
    the system has it, else by writing the zeros."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(descriptor, 0, size)
            return
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    zeros = bytes(64 * 1024)
    for offset in range(0, size, len(zeros)):
        os.pwrite(descriptor, zeros[: size - offset], offset)


def use_process_metrics() -> None:
    """This process keeps its metrics in memory (its own values only on /metrics), not in
    multiprocess files: for a process whose ``PROMETHEUS_MULTIPROC_DIR`` cannot take them. Only
    before its first metric is made."""
    os.environ.pop(MULTIPROCESS_ENV, None)
    values.ValueClass = values.MutexValue


def remove_dead_processes(directory: str | os.PathLike) -> list[int]:
    """Drops the live gauges (queue depth, readiness, open connections, ...) of the processes that
    wrote files in ``directory`` and are gone: a worker killed before its clean exit could drop its
    own (its counters stay: they count what it answered). Returns their pids."""
    pids = set()
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit():
            pids.add(int(pid))
    dead = sorted(pid for pid in pids if not _alive_sibling(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(directory))
    return dead


def _alive_sibling(pid: int) -> bool:
    """Whether ``pid`` is this process or a live process of the same parent (another worker of the
    same supervisor: a reused pid of some other program does not count)."""
    if pid == os.getpid():
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: whether the process exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, ppid = stat.rpartition(")")[2].split()[:2]
    return state not in ("Z", "X", "x") and int(ppid) == os.getppid()


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


#: The headers ``RequestContextMiddleware`` sets on every answer (a route's own copy is replaced).
_SET_HEADERS = frozenset({b"x-request-id", b"x-content-type-options"})


class RequestContextMiddleware:
    """Outermost ASGI layer: request id, ``X-Content-Type-Options: nosniff`` on every answer (JSON,
    metrics, static files, errors: no browser guesses a script out of one), total latency, request
    counter, access log, last-resort 500.

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
        request_context(scope).request_id = request_id
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _SET_HEADERS]
                headers += [(b"x-request-id", request_id.encode()), (b"x-content-type-options", b"nosniff")]
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
                await send_json_error(send_with_id, 500, "internal server error", request_id)
        finally:
            self.record(
                scope["method"],
                scope["path"],
                status,
                time.perf_counter() - started,
                request_id,
                scope.get("client"),
                request_context(scope).log_extra,
            )

    def record(
        self,
        method: str,
        path: str,
        status: int,
        elapsed: float,
        request_id: str,
        client: tuple[str, int] | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Counts an answered request (``elapsed`` seconds from its head) and writes its access-log
        line; also for the requests the connection layer answers without the app (``service.server``)."""
        endpoint = self._endpoint(path)
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if endpoint in INFERENCE_ENDPOINTS:
            self.metrics.stage_seconds.labels(INFERENCE_ENDPOINTS[endpoint], "total").observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):  # the line's JSON costs more than the check
            access_log.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": method,
                        "path": path,
                        "status": status,
                        "ms": round(elapsed * 1000, 2),
                        "client": client[0] if client else None,
                        **(extra or {}),
                    },
                    ensure_ascii=False,
                )
            )


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
