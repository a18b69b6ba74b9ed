"""The faults of issue 26 on a real server over real sockets: idle connections at the connection
limit, a full or read-only disk under the metrics and the uploads, a worker killed with SIGKILL,
SIGTERM with kept-alive connections, and a form field sent twice.

Most tests start ``python -m service`` (``tests.test_server.Server``); the connection table and
the protocol classes are also run in-process, on both of uvicorn's HTTP/1.1 protocols. A full disk
is a small tmpfs (mounted as root; the tests skip, saying why, where mounting is not allowed).
Nothing here asserts on durations: the loops that wait have deadlines only against a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn

from engine.settings import Settings
from service import server as server_module
from service.server import ConnectionTable
from tests.conftest import read_http_answer
from tests.test_server import Server, file_metric, metric

# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture()
def tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """Mounts small tmpfs file systems (a disk that fills up); unmounted after the test (and after
    the servers it started: request this fixture before ``server_factory``)."""
    mounted: list[Path] = []

    def mount(name: str, size: str, *options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(
                f"a full disk needs a small tmpfs, and mounting one failed (root only): {result.stderr}"
            )
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> None:
    """Writes a file in ``directory`` until its disk is full."""
    descriptor = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for block in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(descriptor, bytes(block))
    finally:
        os.close(descriptor)
    with pytest.raises(OSError) as full:
        (directory / "one-more").write_bytes(b"x")
    assert full.value.errno == errno.ENOSPC


def log_of(server: Server) -> str:
    server.log.flush()
    return Path(server.log.name).read_text()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def get(connection: socket.socket, path: str) -> tuple[int, dict[str, str], bytes]:
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return read_http_answer(connection)


def closed_cleanly(connection: socket.socket) -> bool:
    """Waits for the server to close the connection: True for a clean close (FIN), False for a reset."""
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return False


def multipart(*parts: tuple[str, bytes, str | None]) -> tuple[bytes, str]:
    """A multipart body of (name, value, filename) parts and its Content-Type."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: image/jpeg\r\n" if filename else ""
        body += f"--b\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + value + b"\r\n"
    return body + b"--b--\r\n", "multipart/form-data; boundary=b"


def post_head(path: str, length: int, content_type: str = "multipart/form-data; boundary=b") -> bytes:
    """A request head that waits for ``100 Continue`` before its body (sent once the request is
    being handled: a way to know that it is)."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()


def wait_continue(connection: socket.socket) -> None:
    assert connection.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"


def until(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Polls ``condition`` until it is true (a deadline against a hang, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)
    return result


TEXT = "alice smith in paris"

# --- 1. connection limits that idle clients cannot hold -------------------------------------------


def test_silent_connections_are_closed_to_make_room(server_factory):
    server = server_factory(IMM_MAX_CONNECTIONS="4", IMM_HEADER_TIMEOUT_S="60")
    silent = [connect(server.port) for _ in range(4)]  # at the limit, and not one byte sent
    try:
        with connect(server.port) as fresh:
            status, headers, body = get(fresh, "/health")
            assert status == 200 and json.loads(body)["status"] == "ok", body
        assert closed_cleanly(silent[0])  # the longest idle made room
        assert httpx.post(f"{server.url}/ner", data={"text": TEXT}, timeout=30).status_code == 200
        assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert metric(text, "imm_connections_dropped_total", reason="idle_evicted") >= 1
    finally:
        for connection in silent:
            connection.close()


def test_idle_keep_alive_connections_are_closed_to_make_room(server_factory):
    server = server_factory(IMM_MAX_CONNECTIONS="4", IMM_HEADER_TIMEOUT_S="60")
    kept = [connect(server.port) for _ in range(4)]
    try:
        for connection in kept:  # one request each, then idle (kept alive)
            assert get(connection, "/health")[0] == 200
        answers = {}
        with connect(server.port) as fresh:  # one over the limit, and a client that keeps it
            for path in ("/health", "/ready", "/metrics"):
                status, headers, body = get(fresh, path)
                answers[path] = status
            assert closed_cleanly(kept[0])
            assert httpx.post(f"{server.url}/ner", data={"text": TEXT}, timeout=30).status_code == 200
            text = body.decode()
        assert answers == {"/health": 200, "/ready": 200, "/metrics": 200}
        closed = metric(text, "imm_connections_dropped_total", reason="idle_evicted") + metric(
            text, "imm_connections_dropped_total", reason="idle_pressure"
        )
        assert closed >= 1
        assert metric(text, "imm_open_connections") <= 4
    finally:
        for connection in kept:
            connection.close()


class _Fake:
    """A connection for the table: what it closes is recorded."""

    def __init__(self, name: str):
        self.name = name
        self.closed = False

    def close_idle(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return self.name


def test_the_connection_table_closes_the_longest_idle_and_shortens_keep_alive_near_the_limit(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(server_module, "_settings", Settings(max_connections=10, keep_alive_s=75))
    monkeypatch.setattr(server_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    table = ConnectionTable()
    monkeypatch.setattr(server_module, "CONNECTIONS", table)
    idle = [_Fake(f"idle{i}") for i in range(4)]
    busy = [_Fake(f"busy{i}") for i in range(3)]
    for connection in idle + busy:
        assert table.opened(connection)
    for connection in busy:
        table.busy(connection)  # in the middle of a request
    for connection in idle:
        table.became_idle(connection)  # answered, kept alive
    assert table.keep_alive_s() == 75  # 7 of 10 open: no pressure
    clock[0] = 10.0
    eighth = _Fake("eighth")
    assert table.opened(eighth)  # 8 of 10: near the limit
    # Idle for 10 s, past the shortened keep-alive (5 s): closed; the busy ones stay.
    assert all(connection.closed for connection in idle)
    assert not any(connection.closed for connection in busy)
    assert len(table.open) == 4
    newer = [_Fake(f"new{i}") for i in range(6)]
    clock[0] = 11.0
    for connection in newer:
        assert table.opened(connection)
    assert table.keep_alive_s() == 5  # 10 of 10
    eleventh = _Fake("eleventh")
    assert table.opened(eleventh)  # over the limit: the longest idle ("eighth") is closed for it
    assert eighth.closed and not any(c.closed for c in newer + busy)
    assert len(table.open) == 10
    for connection in [*newer, eleventh]:
        table.busy(connection)
    late = _Fake("late")
    assert not table.opened(late)  # every other one is busy: this one is refused
    assert not any(c.closed for c in [*newer, *busy, eleventh])
    table.closed(late)
    assert len(table.open) == 10


# --- the protocol classes in-process: both of uvicorn's HTTP/1.1 implementations -----------------


async def _tiny_app(scope, receive, send) -> None:
    """/slow reads its whole body first; everything answers 200 with a JSON body."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": f"{message['type']}.complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["path"] == "/slow":
        while (await receive()).get("more_body", False):
            pass
    body = json.dumps({"path": scope["path"]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


PROTOCOLS = [
    pytest.param(server_module.H11WithLimits, id="h11"),
    pytest.param(
        getattr(server_module, "HttpToolsWithLimits", None),
        id="httptools",
        marks=pytest.mark.skipif(server_module.HttpToolsProtocol is None, reason="httptools not installed"),
    ),
]


@contextlib.contextmanager
def in_process_server(
    protocol, monkeypatch, max_connections: int = 2
) -> Iterator[tuple[uvicorn.Server, int]]:
    monkeypatch.setattr(
        server_module,
        "_settings",
        Settings(max_connections=max_connections, header_timeout_s=60, keep_alive_s=75, retry_after_s=2),
    )
    monkeypatch.setattr(server_module, "CONNECTIONS", ConnectionTable())
    config = uvicorn.Config(
        _tiny_app, host="127.0.0.1", port=0, http=protocol, log_config=None, timeout_graceful_shutdown=30
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started, "the in-process server started")
    try:
        yield server, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_protocols_make_room_and_refuse_only_when_all_are_busy(protocol, monkeypatch):
    with in_process_server(protocol, monkeypatch) as (_, port):
        kept = [connect(port) for _ in range(2)]
        for connection in kept:
            assert get(connection, "/x")[0] == 200
        with connect(port) as third:
            assert get(third, "/y")[0] == 200
            assert closed_cleanly(kept[0])  # the longest idle made room
        for connection in kept:
            connection.close()
        busy = [connect(port) for _ in range(2)]
        for connection in busy:
            connection.sendall(post_head("/slow", 5, "text/plain"))
            wait_continue(connection)
        with connect(port) as refused:
            status, headers, body = get(refused, "/y")
            assert status == 503
            assert headers["content-type"] == "application/json" and headers["connection"] == "close"
            assert headers["retry-after"] == "2"
            answer = json.loads(body)
            assert answer["request_id"] is None and "too many open connections" in answer["detail"]
            assert closed_cleanly(refused)
        with connect(port) as health:  # /health is answered even so (then the connection closes)
            status, headers, body = get(health, "/health")
            assert status == 200 and headers["connection"] == "close"
        for connection in busy:
            connection.sendall(b"hello")
            assert read_http_answer(connection)[0] == 200
            connection.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_protocols_answer_503_on_kept_alive_connections_during_shutdown(protocol, monkeypatch):
    with in_process_server(protocol, monkeypatch, max_connections=100) as (server, port):
        idle, quiet, slow = connect(port), connect(port), connect(port)
        assert get(idle, "/x")[0] == 200
        assert get(quiet, "/x")[0] == 200
        slow.sendall(post_head("/slow", 5, "text/plain"))
        wait_continue(slow)  # a request in flight
        server.should_exit = True
        until(lambda: server_module.CONNECTIONS.lingering, "the server began its shutdown")
        status, headers, body = get(idle, "/x")
        assert status == 503 and headers["connection"] == "close" and headers["retry-after"] == "2"
        assert headers["content-type"] == "application/json"
        assert "shutting down" in json.loads(body)["detail"]
        assert closed_cleanly(idle)
        slow.sendall(b"hello")
        assert read_http_answer(slow)[0] == 200
        assert closed_cleanly(slow)  # answered, then closed (uvicorn's h11 says so in no header)
        assert closed_cleanly(quiet)  # no request left in flight: the idle ones are closed, not reset
        for connection in (idle, quiet, slow):
            connection.close()


# --- 4. SIGTERM on the real server ---------------------------------------------------------------


def test_sigterm_answers_kept_alive_connections_with_503_and_closes_idle_ones_cleanly(server_factory):
    server = server_factory(IMM_SHUTDOWN_GRACE_S="30")
    idle, quiet, slow = connect(server.port), connect(server.port), connect(server.port)
    try:
        assert get(idle, "/health")[0] == 200
        assert get(quiet, "/health")[0] == 200
        body, content_type = multipart(("text", TEXT.encode(), None))
        slow.sendall(post_head("/ner", len(body), content_type))
        wait_continue(slow)  # in flight when the signal comes
        server.process.send_signal(signal.SIGTERM)
        until(lambda: "Shutting down" in log_of(server), "the server logged its shutdown")
        status, headers, answer = get(idle, "/health")
        assert status == 503, answer
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        assert int(headers["retry-after"]) >= 1
        assert json.loads(answer) == {
            "detail": "the service is shutting down: retry (on another instance)",
            "request_id": None,
        }
        assert closed_cleanly(idle)
        slow.sendall(body)
        status, headers, answer = read_http_answer(slow)
        assert status == 200 and headers["connection"] == "close", answer
        assert closed_cleanly(quiet)
        assert server.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn ends by its signal
    finally:
        for connection in (idle, quiet, slow):
            connection.close()


# --- 2. a full or read-only disk -----------------------------------------------------------------


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_metrics_directory_that_cannot_be_used_leaves_per_process_metrics(tmpfs, server_factory, fault):
    if fault == "full":
        directory = tmpfs("metrics", "8m")
        fill(directory)
    else:
        directory = tmpfs("metrics", "8m", "ro")
    server = server_factory(IMM_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(directory))
    for _ in range(8):  # new connections: both workers take some
        assert httpx.post(f"{server.url}/ner", data={"text": TEXT}, timeout=30).status_code == 200
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    # The worker that answers counts its own requests only (some of the 8, or none).
    assert metric(text, "imm_requests_total", endpoint="/ner", status="200") <= 8
    assert metric(text, "imm_ready") == 1
    log = log_of(server)
    assert "metrics: cannot keep the worker processes' metrics in" in log
    assert "died" not in log and server.process.poll() is None


def test_a_metrics_disk_that_fills_after_start_up_crashes_no_worker(tmpfs, server_factory):
    directory = tmpfs("metrics", "8m")
    server = server_factory(IMM_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(directory))
    fill(directory)  # every worker's files were allocated at start: new series still fit
    files = {
        "/ner": {"text": TEXT},
        "/re": {"text": TEXT, "head_start": "0", "head_end": "11", "tail_start": "15", "tail_end": "20"},
        "/extract": {"text": TEXT},
    }
    sent = 0
    for _ in range(6):
        for path, fields in files.items():
            assert httpx.post(f"{server.url}{path}", data=fields, timeout=30).status_code == 200
            sent += path == "/ner"
        assert httpx.post(f"{server.url}/ner", data={"other": "x"}, timeout=30).status_code == 422
        assert httpx.get(f"{server.url}/nowhere", timeout=10).status_code == 404
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric(text, "imm_requests_total", endpoint="/ner", status="200") == sent  # both workers' files
    assert metric(text, "imm_requests_total", endpoint="/extract", status="200") == 6
    log = log_of(server)
    assert "died" not in log and "metrics: cannot" not in log, log[-3000:]


def test_an_upload_on_a_full_temporary_disk_is_a_507(tmpfs, server_factory):
    spool = tmpfs("spool", "1m")
    server = server_factory(TMPDIR=str(spool))
    picture = os.urandom(1_500_000)  # over 1 MB: spooled to the temporary directory
    answer = httpx.post(
        f"{server.url}/ner",
        data={"text": TEXT},
        files={"image": ("photo.jpg", picture, "image/jpeg")},
        timeout=30,
    )
    assert answer.status_code == 507, answer.text
    assert answer.headers["content-type"] == "application/json" and answer.headers["retry-after"]
    assert "no room to store the upload" in answer.json()["detail"]
    assert "no space left in the temporary directory" in log_of(server)
    assert httpx.post(f"{server.url}/ner", data={"text": TEXT}, timeout=30).status_code == 200


def test_uploads_received_at_once_are_bounded(server_factory):
    server = server_factory(IMM_MAX_UPLOADS_BYTES="1000000")
    _, content_type = multipart(("text", TEXT.encode(), None))
    filler = 600_000 - len(multipart(("text", TEXT.encode(), None), ("image", b"", "x.jpg"))[0])
    big, _ = multipart(("text", TEXT.encode(), None), ("image", bytes(filler), "x.jpg"))
    assert len(big) == 600_000
    with connect(server.port) as first, connect(server.port) as second:
        first.sendall(post_head("/ner", len(big), content_type))
        wait_continue(first)  # 600 kB of the 1 MB budget taken while its body is awaited
        second.sendall(post_head("/ner", len(big), content_type))
        status, headers, answer = read_http_answer(second)
        assert status == 503, answer
        assert headers["content-type"] == "application/json" and int(headers["retry-after"]) >= 1
        assert "IMM_MAX_UPLOADS_BYTES" in json.loads(answer)["detail"]
        # A small one still fits beside the first.
        assert httpx.post(f"{server.url}/ner", data={"text": TEXT}, timeout=30).status_code == 200
        first.sendall(big)
        status, _, answer = read_http_answer(first)
        assert status in (415, 422), answer  # its zeros are no picture: but it was read
    with connect(server.port) as third:  # the budget is free again
        third.sendall(post_head("/ner", len(big), content_type))
        wait_continue(third)
        third.sendall(big)
        assert read_http_answer(third)[0] in (415, 422)


# --- 3. a killed worker's metrics ----------------------------------------------------------------


def test_a_killed_workers_live_gauges_are_dropped(server_factory):
    server = server_factory(IMM_WORKERS="2")
    directory = server.metrics_dir
    # The port answers once one worker listens; on a busy machine the second may still be starting.
    files = until(
        lambda: len(found := list(directory.glob("counter_*.db"))) == 2 and found, "both workers started"
    )
    pids = sorted(int(path.stem.split("_")[1]) for path in files)
    kept = [connect(server.port) for _ in range(20)]
    try:
        for connection in kept:
            assert get(connection, "/health")[0] == 200

        def open_in(pid: int) -> float:
            return file_metric(directory / f"gauge_livesum_{pid}.db", "imm_open_connections")

        victim = max(pids, key=open_in)
        assert open_in(victim) >= 10
        os.kill(victim, signal.SIGKILL)
        until(lambda: not Path(f"/proc/{victim}").exists(), "the killed worker was reaped")
        alive = []
        for connection in kept:
            readable, _, _ = select.select([connection], [], [], 0)
            if readable:  # the killed worker's connections were closed by its end
                with contextlib.suppress(ConnectionResetError):
                    assert connection.recv(1) == b""
            else:
                alive.append(connection)
        assert len(alive) <= 10
        with httpx.Client(base_url=server.url, timeout=10) as client:  # one connection throughout
            text = client.get("/metrics").text
            for mode in ("livesum", "livemin", "livemax"):
                assert not (directory / f"gauge_{mode}_{victim}.db").exists()
            assert (directory / f"counter_{victim}.db").exists()  # what it counted still counts
            assert metric(text, "imm_open_connections") == len(alive) + 1
            assert metric(text, "imm_queue_depth", model="ner") == 0
            # The supervisor starts a new worker: once it is ready, the gauges are still right.
            until(lambda: len(list(directory.glob("counter_*.db"))) == 3, "a new worker started")

            def scrape_when_ready() -> str | None:
                answer = client.get("/metrics").text
                return answer if metric(answer, "imm_ready") == 1 else None

            text = until(scrape_when_ready, "the new worker is ready")
            assert metric(text, "imm_open_connections") == len(alive) + 1
            assert metric(text, "imm_queue_depth", model="ner") == 0
    finally:
        for connection in kept:
            connection.close()


# --- 5. a field sent twice -----------------------------------------------------------------------


def test_a_field_sent_twice_is_a_422_naming_it(bundles):
    from service import create_app
    from tests.test_service import make_settings, started

    async def scenario() -> None:
        async with started(create_app(make_settings(bundles))) as http:
            body, content_type = multipart(("text", b"alice in paris", None), ("text", b"bob in rome", None))
            answer = await http.post("/ner", content=body, headers={"content-type": content_type})
            assert answer.status_code == 422, answer.text
            (error,) = answer.json()["detail"]
            assert error["loc"] == ["body", "text"] and error["msg"].startswith("text given 2 times")
            answer = await http.post(
                "/ner",
                content=b"text=alice+in+paris&text=bob&text=carol",
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert answer.status_code == 422 and "text given 3 times" in answer.text
            body, content_type = multipart(
                ("text", b"alice", None), ("image", b"1", "a.jpg"), ("image", b"2", "b.jpg")
            )
            answer = await http.post("/ner", content=body, headers={"content-type": content_type})
            assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "image"]
            assert (await http.post("/ner", data={"text": "alice in paris"})).status_code == 200

    asyncio.run(scenario())
