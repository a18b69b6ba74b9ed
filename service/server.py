"""Running the app: uvicorn with the service's limits, one process or ``IMM_WORKERS`` of them.

- **Workers.** ``IMM_WORKERS=N`` runs N server processes on one port (uvicorn's supervisor; each
  builds its own app, models and batcher from the same ``IMM_*`` environment, so HTTP and
  multipart parsing use N cores; on a GPU they share the device). Metrics then go through
  prometheus-client's multiprocess mode: each process writes its values to files in
  ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary directory unless it is set) and ``/metrics``
  adds them up across processes. ``0`` (the default) picks 1 for ONNX Runtime on the CPU (one
  process already keeps the cores busy with ONNX Runtime's threads, and batches stay large) and
  4 for the PyTorch runtime on a GPU (docs/service.md).
- **Slow clients.** uvicorn's keep-alive timeout closes idle connections and ``limit_concurrency``
  (``IMM_MAX_CONNECTIONS``) answers 503 beyond that many open connections; what uvicorn lacks, a
  deadline for a request's head, is added to its protocol classes here (``IMM_HEADER_TIMEOUT_S``:
  a connection that has not sent a complete request head within it is closed), and the deadline
  for the body is the app's (``service.guard``, ``IMM_BODY_TIMEOUT_S``: 408).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from functools import cache
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional (uvicorn[standard])
    HttpToolsProtocol = None

from service.observability import logging_config
from service.settings import Settings

log = logging.getLogger("service")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


@cache
def _header_timeout_s() -> float:
    # Read in each worker process from the same environment as its app (a protocol class cannot
    # carry a value into uvicorn's spawned workers).
    return Settings().header_timeout_s


class _HeaderDeadline:
    """A deadline for each request's head (request line and headers), for uvicorn's protocols.

    Armed when a connection opens and when the first bytes of a following request arrive;
    disarmed once the protocol has parsed a complete head (it then starts a new request cycle).
    Idle keep-alive connections are uvicorn's own timeout's business.
    """

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle is None or cycle.response_complete:  # between requests: a new head starts
            self._arm()
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # type: ignore[attr-defined]
            self._disarm()

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(_header_timeout_s(), self._head_expired)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle is None or cycle.response_complete:
            client = self.client  # type: ignore[attr-defined]
            log.warning(
                "closing a connection from %s: no complete request head within %.0f s",
                client,
                _header_timeout_s(),
            )
            self.transport.close()  # type: ignore[attr-defined]


class H11WithHeaderDeadline(_HeaderDeadline, H11Protocol):
    """uvicorn's pure-Python HTTP/1.1 protocol with a deadline for request heads."""


if HttpToolsProtocol is not None:

    class HttpToolsWithHeaderDeadline(_HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools-based protocol (its choice when httptools is installed), with the deadline."""


def _protocol_class() -> type[asyncio.Protocol]:
    return HttpToolsWithHeaderDeadline if HttpToolsProtocol is not None else H11WithHeaderDeadline


def worker_count(settings: Settings) -> int:
    """``IMM_WORKERS``, with 0 resolved: 1 on ONNX Runtime, 4 for the PyTorch runtime."""
    if settings.workers:
        return settings.workers
    from service.runtime import resolve_runtime

    return 4 if resolve_runtime(settings.runtime) == "torch" else 1


def prepare_multiprocess_metrics() -> Path:
    """A clean directory for prometheus-client's multiprocess files, exported to the workers."""
    configured = os.environ.get(MULTIPROCESS_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):  # values of an earlier run would be added in
            stale.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix="imm-metrics-"))
        os.environ[MULTIPROCESS_ENV] = str(directory)
    return directory


def run(settings: Settings) -> None:
    """Serves until SIGTERM/SIGINT (then drains for ``IMM_SHUTDOWN_GRACE_S``)."""
    workers = worker_count(settings)
    options = dict(
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_level),  # applied in every worker process too
        access_log=False,  # RequestContextMiddleware writes one line per request
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        http=_protocol_class(),
        server_header=False,
    )
    if workers == 1:
        from service.app import create_app

        if os.environ.get(MULTIPROCESS_ENV):  # multiprocess metrics asked for anyway: a clean directory
            prepare_multiprocess_metrics()
        uvicorn.run(create_app(settings), **options)
        return
    directory = prepare_multiprocess_metrics()
    os.environ["IMM_WORKERS"] = str(workers)  # the resolved count, for the workers' own Settings()
    log.info("starting %d worker processes (metrics gathered in %s)", workers, directory)
    uvicorn.run("service.app:create_app", factory=True, workers=workers, **options)
