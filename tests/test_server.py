"""``python -m service`` as an operator runs it: several worker processes, slow and greedy clients.

Each test starts the real server in a subprocess on a free loopback port, with the tiny test
bundles, and talks to it over raw sockets or httpx.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import jpeg_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, trained_ner_checkpoint, trained_re_checkpoint) -> dict[str, Path]:
    from export import export_bundle

    root = tmp_path_factory.mktemp("server_bundles")
    return {
        "ner": export_bundle(trained_ner_checkpoint, root / "ner", "int8", log=lambda _: None),
        "re": export_bundle(trained_re_checkpoint, root / "re", "int8", log=lambda _: None),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, output: Callable[[], str], timeout: float = 120) -> None:
    """Polls ``url``/ready until it answers 200; fails with the server's ``output`` if the process
    ends or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, output()
        assert time.monotonic() < deadline, "the server never became ready\n" + output()
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


class Server:
    """``python -m service`` in a subprocess, ready when /ready says so. ``settings`` are environment
    variables (``IMM_*`` or any other, ``PROMETHEUS_MULTIPROC_DIR`` included); None unsets one."""

    def __init__(self, bundles: dict[str, Path], tmp_path: Path, **settings: str | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMM_", "PROMETHEUS_"))}
        env.update(
            IMM_NER_BUNDLE=str(bundles["ner"]),
            IMM_RE_BUNDLE=str(bundles["re"]),
            IMM_HOST="127.0.0.1",
            IMM_PORT=str(self.port),
            IMM_INTRA_OP_THREADS="1",
            IMM_PREPROCESS_THREADS="1",
            PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        )
        for name, value in settings.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        self.metrics_dir = (
            Path(env["PROMETHEUS_MULTIPROC_DIR"]) if "PROMETHEUS_MULTIPROC_DIR" in env else None
        )
        self.log = open(tmp_path / "server.log", "w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"], env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 120) -> None:
        wait_ready(self.url, self.process, self.output, timeout)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        finally:
            self.log.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus exposition ``text`` (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def file_metric(path: Path, sample: str, **labels: str) -> float:
    """The sum of a sample's values over the series with ``labels`` in one multiprocess metrics file."""
    from prometheus_client.mmap_dict import MmapedDict

    total = 0.0
    for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
        _, name, series_labels, _ = json.loads(key)
        if name == sample and all(series_labels.get(k) == v for k, v in labels.items()):
            total += value
    return total


def test_two_workers_serve_one_port_and_metrics_count_both(server_factory):
    server = server_factory(IMM_WORKERS="2")

    def post(number: int) -> int:
        with httpx.Client(base_url=server.url, timeout=30) as client:  # a new connection each time
            return client.post("/ner", data={"text": f"alice smith in paris {number}"}).status_code

    def workers_that_served() -> int:
        files = server.metrics_dir.glob("counter_*.db")
        return sum(1 for path in files if file_metric(path, "imm_requests_total", endpoint="/ner") > 0)

    sent = 0
    with ThreadPoolExecutor(8) as pool:
        # Which process accepts a connection is the kernel's choice: send concurrent requests until
        # both have served some (each worker keeps its counts in files of its own).
        while workers_that_served() < 2 and sent < 400:
            assert list(pool.map(post, range(sent, sent + 16))) == [200] * 16
            sent += 16
    assert len(list(server.metrics_dir.glob("counter_*.db"))) == 2, server.output()
    assert workers_that_served() == 2, server.output()
    # /metrics, answered by one of them, adds both up.
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric(text, "imm_requests_total", endpoint="/ner", status="200") == sent
    assert metric(text, "imm_ready") == 1
    from engine.runtimes import cpu_matrix_features  # what auto chose, on which CPU

    features = ",".join(cpu_matrix_features()) or "none known"
    assert metric(text, "imm_runtime_info", runtime="onnx", cpu_features=features) == 1


def test_a_request_head_sent_too_slowly_is_cut_off(server_factory):
    server = server_factory(IMM_HEADER_TIMEOUT_S="1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(b"POST /ner HTTP/1.1\r\nHost: x\r\n")  # ... and the rest of the head never comes
        started = time.monotonic()
        assert slow.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 8
    # The server still answers everyone else.
    assert httpx.post(f"{server.url}/ner", data={"text": "alice in paris"}, timeout=30).status_code == 200


def test_a_body_trickled_too_slowly_gets_408(server_factory):
    server = server_factory(IMM_BODY_TIMEOUT_S="1")
    body = b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nalice in paris\r\n--b--\r\n'
    head = (
        f"POST /ner HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(head + body[:10])  # then stalls
        answer = b""
        while chunk := slow.recv(4096):  # the server closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"not received within 1 s" in answer


def test_connections_beyond_the_limit_get_503_only_when_all_are_busy(server_factory):
    server = server_factory(IMM_MAX_CONNECTIONS="2", IMM_HEADER_TIMEOUT_S="30")
    # Two idle connections (silent since they opened) hold nobody out: they are closed to make room.
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    try:
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert idle[0].recv(1024) == b""  # the longest idle one was closed by the server
    finally:
        for connection in idle:
            connection.close()
    # Two connections in the middle of a request: a third gets the API's JSON 503, never text/plain.
    body = b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nalice in paris\r\n--b--\r\n'
    head = (
        f"POST /ner HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    busy = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(2)]
    try:
        for connection in busy:
            connection.sendall(head)  # the body comes later
            # The server asks for the body once the request is being handled: it is busy now.
            assert connection.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        answer = httpx.get(f"{server.url}/ready", timeout=10)
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["connection"] == "close" and answer.headers["retry-after"]
        assert "too many open connections" in answer.json()["detail"]
        for connection in busy:
            connection.sendall(body)
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for connection in busy:
            connection.close()


def test_a_photo_on_two_workers(server_factory):
    server = server_factory(IMM_WORKERS="2")
    files = {"image": ("photo.jpg", jpeg_bytes(640, 480), "image/jpeg")}
    answer = httpx.post(f"{server.url}/ner", data={"text": "alice smith in paris"}, files=files, timeout=30)
    assert answer.status_code == 200 and answer.json()["image_used"] is True
