"""Running the app: uvicorn with the service's limits, one process or ``IMM_WORKERS`` of them.

- **Workers.** ``IMM_WORKERS=N`` runs N server processes on one port (uvicorn's supervisor; each
  builds its own app, models and batcher from the same ``IMM_*`` environment, so HTTP and
  multipart parsing use N cores; on a GPU they share the device). Metrics then go through
  prometheus-client's multiprocess mode: each process writes its values to files in
  ``PROMETHEUS_MULTIPROC_DIR`` (unless it is set, a fresh directory in memory-backed ``/dev/shm``
  where there is one, else in the temporary directory; removed at exit) and ``/metrics`` adds them
  up across processes. The directory is checked at start-up and each process allocates its files
  before its first metric; a directory that cannot hold them (full, read-only) leaves each process
  with its own in-memory metrics and an error in the log, never a crashed worker. ``0`` (the
  default) picks 1 for ONNX Runtime on the CPU (one process already keeps the cores busy with ONNX
  Runtime's threads, and batches stay large) and 4 for the PyTorch runtime on a GPU
  (docs/service.md).
- **Connections.** uvicorn's own limit (``limit_concurrency``) counts open connections, so idle
  ones held everybody else out with its plain-text 503. The limit here (``IMM_MAX_CONNECTIONS``
  per process) is kept in the protocol classes instead (``ConnectionTable``): a connection that
  is idle (opened and silent so far, or kept alive between requests) is closed, the longest idle
  first, to make room for a new one; only when every open connection is in the middle of a
  request does the new one get a JSON 503 (``/health`` is still answered on it), and above
  ``PRESSURE_SHARE`` of the limit an idle connection is kept alive ``PRESSURE_KEEP_ALIVE_S`` at
  most. A connection that has not sent a complete request head within ``IMM_HEADER_TIMEOUT_S`` is
  closed (uvicorn has no such deadline); the deadline for the body is the app's
  (``service.guard``, ``IMM_BODY_TIMEOUT_S``: 408).
- **Shutdown.** uvicorn closes idle kept-alive connections at once on SIGTERM, and a request the
  client sent on one just then is reset. Here they stay open while requests are in flight (for at
  most the grace period): a request arriving on one is answered with a JSON 503 and
  ``Connection: close``; once no request is left they are closed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional (uvicorn[standard])
    HttpToolsProtocol = None

from engine import Overloaded
from engine.settings import Settings, available_cores, cgroup_cpu_quota
from service import observability
from service.errors import send_json_error
from service.guard import drain_small_body, drainable
from service.observability import MULTIPROCESS_ENV, logging_config

log = logging.getLogger("service")

#: Above this share of ``IMM_MAX_CONNECTIONS`` open, idle connections are kept alive for at most
#: ``PRESSURE_KEEP_ALIVE_S`` (instead of ``IMM_KEEP_ALIVE_S``).
PRESSURE_SHARE = 0.8
PRESSURE_KEEP_ALIVE_S = 5.0
#: The connection limits' log line comes at most this often (the counts are in the metrics).
LOG_EVERY_S = 10.0
#: A metrics directory must have room for this many sets of a process's files (respawned workers).
ROOM_FOR_PROCESSES = 2

_settings: Settings | None = None


def _server_settings() -> Settings:
    """The settings ``run`` was given; in uvicorn's spawned worker processes, the same environment's."""
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings


class ConnectionTable:
    """This process's open HTTP connections, for ``IMM_MAX_CONNECTIONS``.

    ``idle`` holds the connections that may be closed to make room (opened and silent so far, or
    kept alive between requests), in the order they became idle: longest idle first.
    """

    def __init__(self) -> None:
        self.open: set[Any] = set()
        self.idle: dict[Any, float] = {}
        self.lingering: set[Any] = set()
        self._closer: asyncio.Task | None = None
        self._counts: dict[str, int] = {}
        self._logged_at = float("-inf")

    def opened(self, connection: Any) -> bool:
        """Registers a new connection, closing idle ones while the limit is passed; False when it
        is still passed (every other connection is busy: the new one is to be refused)."""
        settings = _server_settings()
        limit = settings.max_connections
        now = time.monotonic()
        self.open.add(connection)
        self.idle[connection] = now
        observability.connection_opened()
        if len(self.open) >= PRESSURE_SHARE * limit:
            # Near the limit: idle connections get a shorter keep-alive, those idle longer go now.
            cutoff = now - min(settings.keep_alive_s, PRESSURE_KEEP_ALIVE_S)
            while self.idle:
                victim, since = next(iter(self.idle.items()))
                if since > cutoff or victim is connection:
                    break
                self.drop(victim, "idle_pressure")
        return self.make_room(connection)

    def make_room(self, connection: Any) -> bool:
        """Closes idle connections other than ``connection`` while the limit is passed; False if it
        still is (every other connection is busy)."""
        limit = _server_settings().max_connections
        while len(self.open) > limit:
            victim = next((other for other in self.idle if other is not connection), None)
            if victim is None:
                break
            self.drop(victim, "idle_evicted")
        return len(self.open) <= limit

    def closed(self, connection: Any) -> None:
        if connection in self.open:
            self.open.discard(connection)
        self.idle.pop(connection, None)
        self.lingering.discard(connection)
        observability.connection_closed()

    def busy(self, connection: Any) -> None:
        """The connection's next request has begun (its first bytes arrived)."""
        self.idle.pop(connection, None)

    def became_idle(self, connection: Any) -> None:
        if connection in self.open:
            self.idle.pop(connection, None)
            self.idle[connection] = time.monotonic()

    def keep_alive_s(self) -> float:
        """The keep-alive timeout of a connection that becomes idle now."""
        settings = _server_settings()
        if len(self.open) >= PRESSURE_SHARE * settings.max_connections:
            return min(settings.keep_alive_s, PRESSURE_KEEP_ALIVE_S)
        return settings.keep_alive_s

    def drop(self, connection: Any, reason: str) -> None:
        """Closes an idle connection for the limits."""
        self.open.discard(connection)
        self.idle.pop(connection, None)
        connection.close_idle()
        self.count(reason)

    def count(self, reason: str) -> None:
        """Counts a connection closed or refused for the limits; logs the counts every ``LOG_EVERY_S``."""
        observability.connection_dropped(reason)
        self._counts[reason] = self._counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            counts, self._counts = self._counts, {}
            settings = _server_settings()
            log.warning(
                "connection limits (IMM_MAX_CONNECTIONS=%d, %d open now): %s",
                settings.max_connections,
                len(self.open),
                ", ".join(f"{_REASONS[reason]}: {number}" for reason, number in sorted(counts.items())),
            )

    def linger(self, connection: Any) -> None:
        """At shutdown: keeps an idle connection open while requests are in flight, then closes it."""
        self.lingering.add(connection)
        if self._closer is None:
            self._closer = connection.loop.create_task(self._close_lingering(connection.tasks))

    async def _close_lingering(self, tasks: set) -> None:
        while tasks:  # the server's requests in flight (cancelled when the grace period ends)
            await asyncio.sleep(0.05)
        for connection in list(self.lingering):
            if connection.is_idle():
                connection.close_idle()
        self._closer = None


_REASONS = {
    "idle_evicted": "idle connections closed to make room",
    "idle_pressure": "idle connections closed near the limit",
    "refused": "requests refused with 503 (every connection busy)",
    "head_timeout": "connections closed without a complete request head in time (IMM_HEADER_TIMEOUT_S)",
}

#: The one table of this process (uvicorn's protocol objects, one per connection, register there).
CONNECTIONS = ConnectionTable()


def _over_limit_app(connection: Any, app: ASGIApp) -> ASGIApp:
    """The app of a connection opened past the limit: when its request comes, idle connections are
    closed to make room if they can be; if not, a JSON 503 (``/health`` is answered all the same).
    The connection is closed after the answer either way."""

    async def over_limit(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or CONNECTIONS.make_room(connection):
            connection.app = app  # room now: the connection is like any other from here on
            await app(scope, receive, send)
            return
        if scope["path"] == "/health":

            async def closing_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
                await send(message)

            await app(scope, receive, closing_send)
            return
        limit = _server_settings().max_connections
        detail = f"too many open connections (the limit is {limit} per process, all busy): retry later"
        await _refuse(scope, receive, send, detail)
        CONNECTIONS.count("refused")

    return over_limit


async def _shutting_down_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The app of an idle connection once the server is shutting down."""
    await _refuse(scope, receive, send, "the service is shutting down: retry (on another instance)")


async def _refuse(scope: Scope, receive: Receive, send: Send, detail: str) -> None:
    """A JSON 503 with ``Retry-After`` and ``Connection: close``, a small body read first so that
    closing the connection after the answer does not reset it before the client has read it."""
    await drain_small_body(scope, receive)
    retry_after = str(max(1, _server_settings().retry_after_s)).encode()
    headers = [(b"retry-after", retry_after), (b"connection", b"close")]
    await send_json_error(send, 503, detail, None, headers)


class _ConnectionLimits:
    """The service's limits for uvicorn's HTTP/1.1 protocols (one protocol object per connection).

    - Registers each connection in ``CONNECTIONS``: idle ones (before their first request, between
      requests) may be closed to make room; a connection opened when none can be gets a JSON 503
      for its request (``/health`` answered).
    - A deadline for each request's head (request line and headers), armed when the connection
      opens and when the first bytes of a following request arrive, disarmed once the protocol has
      parsed a complete head (it then starts a new request cycle).
    - The keep-alive timeout shortened near the limit.
    - At shutdown, idle connections answer requests with a JSON 503 and close once the server has no
      request left in flight (``ConnectionTable.linger``).
    """

    _head_timer: asyncio.TimerHandle | None = None
    #: The served app's ``refuse_early`` (``HttpToolsWithLimits``), None where it is not to be used.
    _refuse_early: Any = None
    _refused_last = False  # the last request was refused at its head and has ended (body drained)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        if CONNECTIONS.opened(self):
            self._refuse_early = _served_refuse_early(self.app)  # type: ignore[has-type]
        else:
            self.app = _over_limit_app(self, self.app)  # type: ignore[has-type]
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle  # type: ignore[has-type]
        if cycle is None or cycle.response_complete:  # between requests: a new head starts
            CONNECTIONS.busy(self)
            self._arm()
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # type: ignore[has-type]
            self._disarm()
        elif self._refused_last and not self.transport.is_closing():  # type: ignore[has-type]
            # Refused at its head, body drained, nothing after it: idle, as after any answer.
            self._refused_last = False
            self._disarm()
            self.on_response_complete()

    def on_response_complete(self) -> None:
        self.timeout_keep_alive = CONNECTIONS.keep_alive_s()  # read by uvicorn as it arms the timer
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and self.is_idle():  # type: ignore[has-type]
            CONNECTIONS.became_idle(self)

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        self._disarm()
        CONNECTIONS.closed(self)
        super().connection_lost(exc)  # type: ignore[misc]

    def shutdown(self) -> None:
        """uvicorn's call at shutdown: an idle connection stays open for now (``linger``), refusing."""
        self._refuse_early = None
        if self.is_idle():
            self.app = _shutting_down_app
            CONNECTIONS.linger(self)
        else:
            super().shutdown()  # type: ignore[misc]

    def is_idle(self) -> bool:
        cycle = self.cycle  # type: ignore[has-type]
        return (cycle is None or cycle.response_complete) and not getattr(self, "pipeline", None)

    def close_idle(self) -> None:
        """Closes the connection as uvicorn closes one whose keep-alive timeout has passed."""
        self._disarm()
        self._unset_keepalive_if_required()  # type: ignore[attr-defined]
        try:
            self.timeout_keep_alive_handler()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - h11's state machine may object: close it anyway
            self.transport.close()  # type: ignore[has-type]

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(  # type: ignore[attr-defined]
                _server_settings().header_timeout_s, self._head_expired
            )

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.is_idle() and not self.transport.is_closing():  # type: ignore[has-type]
            CONNECTIONS.count("head_timeout")
            self.transport.close()  # type: ignore[has-type]


class H11WithLimits(_ConnectionLimits, H11Protocol):
    """uvicorn's pure-Python HTTP/1.1 protocol with the service's connection limits."""


def _served_refuse_early(app: Any) -> Any:
    """The ``refuse_early`` of the app under uvicorn's wrappers (``ServiceApp``), or None."""
    while app is not None and not hasattr(app, "refuse_early"):
        app = getattr(app, "app", None)
    return getattr(app, "refuse_early", None)


@functools.lru_cache(maxsize=1024)
def _json_detail(message: str) -> bytes:
    """The JSON string of a refusal's detail (``json_error_body``'s, whose layout the answer keeps):
    the messages repeat (a full queue's is always the same), so each is encoded once."""
    return json.dumps(f"{message}: retry later", ensure_ascii=False).encode()


_REFUSAL_HEAD = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"


def refusal_answer(
    error: Overloaded, request_id: str, keep_alive: bool, default_headers: list[tuple[bytes, bytes]]
) -> bytes:
    """The bytes of the JSON 503 of a request refused at its head: the guard's answer (the same body,
    ``Retry-After`` and ``X-Request-ID``), without the app."""
    # Request ids are plain (``new_request_id``: letters, digits, ``._:-``): nothing to escape.
    body = b'{"detail": %s, "request_id": "%s"}' % (_json_detail(str(error)), request_id.encode())
    retry_after = str(max(1, math.ceil(error.retry_after_s)))
    return b"".join(
        [
            _REFUSAL_HEAD,
            *[b"%s: %s\r\n" % header for header in default_headers],
            b"content-length: %d\r\nretry-after: %s\r\nx-request-id: %s\r\n%s\r\n"
            % (
                len(body),
                retry_after.encode(),
                request_id.encode(),
                b"" if keep_alive else b"connection: close\r\n",
            ),
            body,
        ]
    )


if HttpToolsProtocol is not None:

    class HttpToolsWithLimits(_ConnectionLimits, HttpToolsProtocol):
        """uvicorn's httptools-based protocol (its choice when httptools is installed), with the limits,
        and admission's refusals answered at the connection layer: a request the engine would refuse
        (its queue full, overloaded, or unable to answer by the deadline) is answered from its head,
        in the parser's callback, without the app, the ASGI task and the body's messages (under
        overload refusals outnumber answers). Its body (at most ``DRAIN_LIMIT``) is skipped to keep
        the connection, as the guard drains it; a larger one, or one behind ``Expect:
        100-continue``, closes the connection after the answer."""

        _refusing = False  # the current request was refused at its head: its body is skipped

        def on_message_begin(self) -> None:
            self._refused_last = False
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            if self._refuse_early is None or not self._refused_at_head():
                super().on_headers_complete()

        def _refused_at_head(self) -> bool:
            cycle = self.cycle
            if (cycle is not None and not cycle.response_complete) or self.pipeline or self.flow.write_paused:
                return False  # an answer is still due before this one: the app keeps the order
            path = self.url.partition(b"?")[0]
            if b"%" in path or not path.startswith(b"/") or not path.isascii():
                return False  # left to uvicorn's own reading of the path
            method = self.parser.get_method().decode("ascii")
            refusal = self._refuse_early(
                method, self.root_path + path.decode("ascii"), self.headers, self.client
            )
            if refusal is None:
                return False
            keep_alive = self.parser.should_keep_alive() and drainable({"headers": self.headers})
            self.transport.write(refusal_answer(*refusal, keep_alive, self.server_state.default_headers))
            if keep_alive:
                self._refusing = True  # the head timer, still armed, bounds the wait for the body
            else:
                self.transport.close()
            return True

        def on_body(self, body: bytes) -> None:
            if not self._refusing:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refusing:
                super().on_message_complete()
                return
            self._refusing = False
            self._refused_last = True  # idle from here unless another request follows (data_received)


def protocol_class() -> type[asyncio.Protocol]:
    """The HTTP/1.1 protocol the server runs: httptools where installed, else h11; with the limits."""
    return HttpToolsWithLimits if HttpToolsProtocol is not None else H11WithLimits


def worker_count(settings: Settings) -> int:
    """``IMM_WORKERS``, with 0 resolved: 1 on ONNX Runtime, 4 for the PyTorch runtime."""
    if settings.workers:
        return settings.workers
    from engine.runtimes import resolve_runtime

    return 4 if resolve_runtime(settings.runtime) == "torch" else 1


def sizing(settings: Settings) -> str:
    """The sizes that follow from the cores this process may use (``available_cores``: its affinity
    mask and cgroup quota), for the start-up log."""
    from engine.runtimes import ProviderError, inference_workers, intra_op_threads, resolve_runtime

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpu_quota()
    try:
        calls = f"{inference_workers(settings)} inference worker(s) per model"
        if resolve_runtime(settings.runtime) != "torch":
            calls += f" of {intra_op_threads(settings)} ONNX Runtime thread(s)"
        if settings.inference_nice_levels:
            calls += f" at nice +{settings.inference_nice_levels}"
        calls += ", "
    except ProviderError:  # IMM_PROVIDERS names one this machine lacks: the models' loading says so
        calls = ""
    return (
        f"sizing: {available_cores()} core(s) to use (affinity: {affinity} of the machine's "
        f"{os.cpu_count()} CPUs; cgroup quota: {'none' if quota is None else f'{quota:g} CPUs'}): "
        f"{calls}{settings.preprocess_workers} preprocessing thread(s), {worker_count(settings)} server process(es)"
    )


def _process_files_bytes() -> int:
    return len(observability.MULTIPROCESS_FILES) * observability.MULTIPROCESS_FILE_BYTES


def _memory_directory(processes: int) -> str | None:
    """``/dev/shm`` when it is a writable directory with room for the metrics, else None."""
    shm = "/dev/shm"
    try:
        if not (os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK)):
            return None
        stat = os.statvfs(shm)
    except OSError:
        return None
    room = stat.f_bavail * stat.f_frsize
    return shm if room >= 4 * processes * _process_files_bytes() else None


def _check_room(directory: Path, processes: int) -> None:
    """``OSError`` unless ``directory`` takes the files of ``processes`` processes (allocated, then
    removed): a read-only directory, or one without the room."""
    probe = directory / f".imm-space-check-{os.getpid()}"
    descriptor = os.open(probe, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        observability._allocate(descriptor, processes * _process_files_bytes())
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)


def prepare_multiprocess_metrics(workers: int = 1) -> Path | None:
    """A clean directory for prometheus-client's multiprocess files, exported to the workers in
    ``PROMETHEUS_MULTIPROC_DIR``: the configured one, else a new one in ``/dev/shm`` (memory) where
    it can be, else in the temporary directory. None, with the variable unset (each process then
    keeps its own metrics) and an error logged, when it cannot hold the files."""
    configured = os.environ.get(MULTIPROCESS_ENV)
    directory = Path(configured) if configured else None
    try:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("*.db"):  # values of an earlier run would be added in
                stale.unlink()
        else:
            directory = Path(tempfile.mkdtemp(prefix="imm-metrics-", dir=_memory_directory(workers)))
        _check_room(directory, workers * ROOM_FOR_PROCESSES)
    except OSError as error:
        os.environ.pop(MULTIPROCESS_ENV, None)
        if directory is not None and not configured:
            shutil.rmtree(directory, ignore_errors=True)
        log.error(
            "metrics: cannot keep the worker processes' metrics in %s (%s): each process keeps its own, "
            "so /metrics reports the values of the process that answers it, not their sum",
            directory if directory is not None else "a temporary directory",
            error,
        )
        return None
    os.environ[MULTIPROCESS_ENV] = str(directory)
    return directory


def prepare_process_metrics() -> None:
    """In a process about to make its metrics: drops the live gauges of dead workers and allocates
    this process's files in ``PROMETHEUS_MULTIPROC_DIR``, or, when that fails (a full or read-only
    disk), switches this process to its own in-memory metrics, with an error in the log."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return
    try:
        dead = observability.remove_dead_processes(directory)
        if dead:
            log.info("metrics: dropped the live gauges of ended worker processes %s", dead)
        observability.reserve_multiprocess_files(directory, os.getpid())
    except OSError as error:
        observability.use_process_metrics()
        log.error(
            "metrics: cannot write this process's metrics to %s (%s): it keeps its own in memory, "
            "and /metrics answered by it reports its values only",
            directory,
            error,
        )


def worker_app() -> ASGIApp:
    """The app of one worker process (uvicorn's factory): its metric files first, then the app."""
    prepare_process_metrics()
    from service.app import create_app

    return create_app(freeze_heap=True)


def run(settings: Settings) -> None:
    """Serves until SIGTERM/SIGINT (then drains for ``IMM_SHUTDOWN_GRACE_S``)."""
    global _settings
    _settings = settings
    workers = worker_count(settings)
    log.info(sizing(settings))
    options = dict(
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_level),  # applied in every worker process too
        access_log=False,  # RequestContextMiddleware writes one line per request
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        timeout_keep_alive=settings.keep_alive_s,
        # No limit_concurrency: IMM_MAX_CONNECTIONS is kept by the protocol class (ConnectionTable).
        http=protocol_class(),
        server_header=False,
    )
    configured = os.environ.get(MULTIPROCESS_ENV)
    if workers == 1:
        from service.app import create_app

        if configured:  # multiprocess metrics asked for anyway: a clean directory
            prepare_multiprocess_metrics()
            prepare_process_metrics()
        uvicorn.run(create_app(settings, freeze_heap=True), **options)
        return
    directory = prepare_multiprocess_metrics(workers)
    os.environ["IMM_WORKERS"] = str(workers)  # the resolved count, for the workers' own Settings()
    log.info(
        "starting %d worker processes (metrics %s)",
        workers,
        f"gathered in {directory}" if directory else "per process",
    )
    try:
        uvicorn.run(
            "service.server:worker_app",
            factory=True,
            workers=workers,
            # uvicorn's supervisor kills a worker that misses its ping for 5 s: one still importing
            # and loading its models on busy cores (or capturing CUDA graphs) missed it, and was
            # restarted again and again (seen on 2 loaded cores, and in the GPU rehearsal).
            timeout_worker_healthcheck=60,
            **options,
        )
    finally:
        if directory is not None and not configured:
            shutil.rmtree(directory, ignore_errors=True)
