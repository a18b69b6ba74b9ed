"""Overload without collapse: deadlines, cancellation of departed clients, refusal before the body.

The model is held inside its runtime call (a wrapped ``run_batch`` that waits on an event) so that
queues fill deterministically; every assertion is on statuses, counters and what the model saw,
never on speed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from engine import Engine, InvalidInput
from engine.batcher import Batcher
from imm.client import RetryBudget, post_with_retries
from service import create_app
from service import server as server_module
from tests.conftest import HeldModel, read_http_answer
from tests.test_service import (  # noqa: F401 - server: the module's server fixture, for client
    ServerThread,
    assert_clean_error,
    metric_value,
    server,
    started,
)
from tests.test_service import make_settings as service_settings


def make_settings(bundles, **overrides: Any):
    """The service tests' settings with one inference worker: the held model then holds every call."""
    return service_settings(bundles, **{"inference_workers": 1, **overrides})


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# --- deadlines -------------------------------------------------------------------------------------


def test_a_request_whose_deadline_passes_in_the_queue_leaves_it_uncomputed_with_504(bundles):
    async def scenario() -> None:
        app = create_app(make_settings(bundles, re_bundle=None, max_batch_size=1, warmup=False))
        async with started(app) as http:
            model = HeldModel(app.state.engine.slots["ner"].batcher)
            first = asyncio.create_task(http.post("/ner", data={"text": "alice in paris"}))
            await asyncio.to_thread(model.entered.wait, 10)
            late = await http.post(
                "/ner", data={"text": "bob in london"}, headers={"X-Request-Timeout": "0.2"}
            )
            assert_clean_error(late, 504)
            assert "deadline" in late.json()["detail"]
            model.release()
            assert (await first).status_code == 200
            metrics = (await http.get("/metrics")).text
        assert model.seen == ["alice in paris"]  # the late request never reached the model
        assert metric_value(metrics, "imm_dropped_total", model="ner", reason="deadline") == 1
        assert metric_value(metrics, "imm_abandoned_rows_total", model="ner") == 0

    asyncio.run(scenario())


def test_a_request_the_queue_could_not_answer_in_time_is_refused_at_once(bundles):
    """Once the model is known to take about 0.3 s a row, a request with a 0.5 s deadline behind
    three queued ones gets its 503 and Retry-After at once, and the model never sees it."""

    async def scenario() -> None:
        app = create_app(make_settings(bundles, re_bundle=None, max_batch_size=1, warmup=False))
        async with started(app) as http:
            batcher = app.state.engine.slots["ner"].batcher
            model = HeldModel(batcher)
            warm = asyncio.create_task(http.post("/ner", data={"text": "warm"}))
            await asyncio.to_thread(model.entered.wait, 10)
            await asyncio.sleep(0.3)  # one call held 0.3 s from its start: the estimate
            model.release()
            assert (await warm).status_code == 200
            assert batcher.seconds_per_row >= 0.25
            model.released.clear()
            queued = [
                asyncio.create_task(
                    http.post("/ner", data={"text": f"dave {n}"}, headers={"X-Request-Timeout": "30"})
                )
                for n in range(4)
            ]
            await until(lambda: batcher.depth == 3)  # one in the model, three waiting
            refused = await http.post("/ner", data={"text": "erin"}, headers={"X-Request-Timeout": "0.5"})
            assert_clean_error(refused, 503)
            assert int(refused.headers["retry-after"]) >= 1
            assert "deadline" in refused.json()["detail"]
            patient = asyncio.create_task(
                http.post("/ner", data={"text": "frank"}, headers={"X-Request-Timeout": "30"})
            )
            await until(lambda: batcher.depth == 4)  # a patient request is still admitted
            model.release()
            assert all(a.status_code == 200 for a in await asyncio.gather(*queued, patient))
            metrics = (await http.get("/metrics")).text
        assert "erin" not in model.seen and "frank" in model.seen
        assert metric_value(metrics, "imm_rejected_total", model="ner") == 1

    asyncio.run(scenario())


def test_the_deadline_header_must_be_a_positive_number(client):
    for value in ("soon", "-1", "0", "nan", "inf"):
        answer = client.post("/ner", data={"text": "alice"}, headers={"X-Request-Timeout": value})
        assert_clean_error(answer, 400)
        assert "X-Request-Timeout" in answer.json()["detail"]
    assert (
        client.post("/ner", data={"text": "alice"}, headers={"X-Request-Timeout": "2.5"}).status_code == 200
    )


def test_openapi_documents_the_deadline_header_and_504(client):
    schema = client.get("/openapi.json").json()
    for path in ("/ner", "/re", "/extract"):
        operation = schema["paths"][path]["post"]
        assert "X-Request-Timeout" in [p["name"] for p in operation["parameters"] if p["in"] == "header"]
        assert {"503", "504"} <= set(operation["responses"])


# --- cancellation --------------------------------------------------------------------------------------


def _raw_request(
    path: str, fields: dict[str, str], extra_headers: str = "", declared: int | None = None
) -> bytes:
    boundary = "imm-test-boundary"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            for name, value in fields.items()
        )
        + f"--{boundary}--\r\n".encode()
    )
    length = len(body) if declared is None else declared
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\n{extra_headers}\r\n"
    ).encode()
    return head + body


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = read_http_answer(sock)
    return status, headers, json.loads(body)


@contextmanager
def held_server(bundles, http: Any = "auto", **overrides: Any) -> Iterator[tuple[str, int, Any, HeldModel]]:
    settings = make_settings(bundles, re_bundle=None, warmup=False, **overrides)
    app = create_app(settings)
    with ServerThread(app, http) as url:
        model = HeldModel(app.state.engine.slots["ner"].batcher)
        try:
            yield url, int(url.rsplit(":", 1)[1]), app, model
        finally:
            model.release()


def test_a_client_that_disconnects_while_queued_cancels_its_request(bundles):
    with (
        held_server(bundles, max_batch_size=1) as (url, port, app, model),
        httpx.Client(base_url=url) as http,
    ):
        batcher = app.state.engine.slots["ner"].batcher
        pool = ThreadPoolExecutor(1)
        first = pool.submit(http.post, "/ner", data={"text": "alice in paris"}, timeout=30)
        assert model.entered.wait(10)
        with socket.create_connection(("127.0.0.1", port)) as gone:
            gone.sendall(_raw_request("/ner", {"text": "bob in london"}))
            wait_until(lambda: batcher.depth == 1)
        # The socket is closed: the server sees the disconnect and takes the request out of the queue.
        wait_until(lambda: batcher.depth == 0)
        model.release()
        assert first.result(30).status_code == 200
        metrics = http.get("/metrics").text
        pool.shutdown()
    assert model.seen == ["alice in paris"]
    assert metric_value(metrics, "imm_dropped_total", model="ner", reason="cancelled") == 1
    assert metric_value(metrics, "imm_requests_total", endpoint="/ner", status="499") == 1


def test_rows_computed_for_a_client_that_left_during_its_batch_are_counted_abandoned(bundles):
    with (
        held_server(bundles, max_batch_size=1) as (url, port, app, model),
        httpx.Client(base_url=url) as http,
    ):
        with socket.create_connection(("127.0.0.1", port)) as gone:
            gone.sendall(_raw_request("/ner", {"text": "carol in tokyo"}))
            assert model.entered.wait(10)  # its batch is running
        wait_until(lambda: metric_value(http.get("/metrics").text, "imm_requests_total", status="499") == 1)
        model.release()
        wait_until(
            lambda: metric_value(http.get("/metrics").text, "imm_abandoned_rows_total", model="ner") == 1
        )
        assert model.seen == ["carol in tokyo"]


def test_engine_calls_cancelled_while_waiting_never_reach_the_model(bundles):
    async def scenario() -> None:
        engine = Engine(make_settings(bundles, re_bundle=None, max_batch_size=1, warmup=False))
        async with engine:
            model = HeldModel(engine.slots["ner"].batcher)
            first = asyncio.create_task(engine.ner("alice in paris"))
            await asyncio.to_thread(model.entered.wait, 10)
            waiting = [asyncio.create_task(engine.ner(f"bob {n}")) for n in range(3)]
            await until(lambda: engine.slots["ner"].batcher.depth == 3)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            assert engine.slots["ner"].batcher.depth == 0
            model.release()
            answer = await first
            assert answer.model == engine.slots["ner"].pipeline.name
            with pytest.raises(InvalidInput) as caught:
                await engine.ner("   ")
            assert caught.value.field == "text"
            dropped = metric_value(
                engine.metrics.exposition().decode(), "imm_dropped_total", model="ner", reason="cancelled"
            )
        assert model.seen == ["alice in paris"]
        assert dropped == 3

    asyncio.run(scenario())


# --- refusing before the body ----------------------------------------------------------------------------


@contextmanager
def full_queue(bundles, http: Any = "auto") -> Iterator[tuple[int, Any, HeldModel]]:
    """A server whose NER queue is full: one request in the held model, one queued (max_queue=1)."""
    with held_server(bundles, http, max_batch_size=1, max_queue=1, max_upload_bytes=8 * 1024 * 1024) as (
        url,
        port,
        app,
        model,
    ):
        batcher = app.state.engine.slots["ner"].batcher
        pool = ThreadPoolExecutor(2)
        with httpx.Client(base_url=url, timeout=30) as http:
            answers = [pool.submit(http.post, "/ner", data={"text": "alice in paris"})]
            assert model.entered.wait(10)
            answers.append(pool.submit(http.post, "/ner", data={"text": "bob in london"}))
            wait_until(lambda: batcher.depth == 1)
            try:
                yield port, app, model
            finally:
                model.release()
                assert [a.result(30).status_code for a in answers] == [200, 200]
                pool.shutdown()


#: Where an early refusal is answered: in the app's guard (uvicorn's own protocol), or at the
#: connection layer (the service's protocol class, as ``python -m service`` runs it).
REFUSING_LAYERS = [
    pytest.param("auto", id="guard"),
    pytest.param(
        getattr(server_module, "HttpToolsWithLimits", None),
        id="connection",
        marks=pytest.mark.skipif(server_module.HttpToolsProtocol is None, reason="httptools not installed"),
    ),
]


@pytest.mark.parametrize("http", REFUSING_LAYERS)
def test_a_large_upload_against_a_full_queue_is_refused_before_its_body_is_sent(bundles, http):
    five_mb = 5 * 1024 * 1024
    with full_queue(bundles, http) as (port, app, model):
        for extra in ("", "Expect: 100-continue\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                request = _raw_request("/ner", {"text": "x"}, extra, declared=five_mb)
                head = request[: request.index(b"\r\n\r\n") + 4]
                sock.sendall(head + b"-" * 1024)  # 1 KiB of the declared 5 MiB: the rest never comes
                status, headers, body = _read_response(sock)
                assert status == 503, body
                assert "queue is full" in body["detail"] and body["request_id"]
                assert headers["content-type"] == "application/json" and int(headers["retry-after"]) >= 1
                assert headers["connection"] == "close"  # the unread body cannot precede another request
                assert sock.recv(1) == b""  # and the server closed it
        metrics = app.state.engine.metrics.exposition().decode()
    assert metric_value(metrics, "imm_rejected_total", model="ner") == 2
    assert model.seen == ["alice in paris", "bob in london"]


@pytest.mark.parametrize("http", REFUSING_LAYERS)
def test_a_small_refused_request_keeps_its_connection_for_the_next(bundles, http):
    with (
        full_queue(bundles, http) as (port, _app, _model),
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
    ):
        sock.sendall(_raw_request("/ner", {"text": "carol in tokyo"}))
        status, headers, body = _read_response(sock)
        assert status == 503 and "queue is full" in body["detail"]
        assert headers.get("connection") != "close"
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert _read_response(sock)[0] == 200


@pytest.mark.skipif(server_module.HttpToolsProtocol is None, reason="httptools not installed")
def test_a_refusal_at_the_connection_layer_never_enters_the_app(bundles):
    """With the service's protocol class a request the queue refuses is answered from its head, in
    the parser's callback: the app (middleware, FastAPI) never sees it, yet the answer is the guard's
    (JSON, Retry-After, the request id) and it is counted; the connection serves the next request."""
    with full_queue(bundles, server_module.HttpToolsWithLimits) as (port, app, model):
        entered: list[str] = []
        stack = app.middleware_stack

        async def counting(scope, receive, send) -> None:
            entered.append(scope.get("path", scope["type"]))
            await stack(scope, receive, send)

        app.middleware_stack = counting
        request = _raw_request("/ner", {"text": "carol in tokyo"}, "X-Request-ID: refused-1\r\n")
        head_end = request.index(b"\r\n\r\n") + 4
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request[: head_end + 10])  # the head and a part of the body: answered at once
            answers = [_read_response(sock)]
            sock.sendall(request[head_end + 10 :])  # the rest of the body: skipped
            for _ in range(2):  # the connection takes the next requests
                sock.sendall(request)
                answers.append(_read_response(sock))
            for status, headers, body in answers:
                assert status == 503 and "queue is full" in body["detail"]
                assert headers["content-type"] == "application/json"
                assert headers["retry-after"] in {"1", "2"} and headers.get("connection") != "close"
                assert headers["x-request-id"] == body["request_id"] == "refused-1"
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            assert _read_response(sock)[0] == 200
        assert entered == ["/health"]
        metrics = app.state.engine.metrics.exposition().decode()
        assert metric_value(metrics, "imm_rejected_total", model="ner") == 3
        assert metric_value(metrics, "imm_requests_total", endpoint="/ner", status="503") == 3
    assert model.seen == ["alice in paris", "bob in london"]


def test_the_client_recipe_retries_after_retry_after_and_only_within_its_budget(bundles):
    """imm.client (docs/service.md's recipe) against a full queue: a 503 is retried once its
    Retry-After has passed, while the budget has a retry to spend; then the 503 is returned at once.
    Its waits are recorded, not slept."""
    with full_queue(bundles) as (port, app, model), httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        batcher = app.state.engine.slots["ner"].batcher
        waits: list[float] = []
        budget = RetryBudget(ratio=0.1, burst=1)
        form = {"data": {"text": "carol in tokyo"}, "timeout": 30}
        answer = post_with_retries(http, "/ner", budget, attempts=3, sleep=waits.append, **form)
        assert answer.status_code == 503 and len(waits) == 1  # one retry in the budget: spent
        assert 1 <= waits[0] <= 1.5 * 2  # Retry-After (1 or 2 s), and up to half of it more
        assert post_with_retries(http, "/ner", budget, sleep=waits.append, **form).status_code == 503
        assert len(waits) == 1  # the budget had 0.1 of a retry: the 503 came back at once
        refused = metric_value(
            app.state.engine.metrics.exposition().decode(), "imm_rejected_total", model="ner"
        )
        assert refused == 3

        def drained(seconds: float) -> None:  # the wait: meanwhile the model takes the queue
            waits.append(seconds)
            model.release()
            wait_until(lambda: batcher.depth == 0 and not batcher._running)

        answer = post_with_retries(http, "/ner", RetryBudget(), sleep=drained, **form)
        assert answer.status_code == 200 and len(waits) == 2
    assert model.seen[-1] == "carol in tokyo"


def test_a_request_holds_its_place_in_the_queue_from_its_head_until_it_ends(bundles):
    """Admission happens once, at the request's head: while its body is on its way it counts among the
    requests ahead of later ones, and its place is given back when it ends without reaching the model."""
    with (
        held_server(bundles, max_batch_size=1, max_queue=1) as (url, port, app, model),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        batcher = app.state.engine.slots["ner"].batcher
        pool = ThreadPoolExecutor(2)
        first = pool.submit(http.post, "/ner", data={"text": "alice in paris"})
        assert model.entered.wait(10)
        request = _raw_request("/ner", {"text": "bob in london"})
        with socket.create_connection(("127.0.0.1", port), timeout=10) as uploading:
            uploading.sendall(request[: request.index(b"\r\n\r\n") + 4])  # the head; the body later
            wait_until(lambda: batcher._incoming == 1)
            refused = http.post("/ner", data={"text": "carol in tokyo"})
            assert_clean_error(refused, 503)
            assert "queue is full" in refused.json()["detail"]
        # The upload was abandoned: its place is free again, and the next request is admitted.
        wait_until(lambda: batcher._incoming == 0)
        second = pool.submit(http.post, "/ner", data={"text": "dave in rome"})
        wait_until(lambda: batcher.depth == 1)
        model.release()
        assert [first.result(30).status_code, second.result(30).status_code] == [200, 200]
        pool.shutdown()
    assert model.seen == ["alice in paris", "dave in rome"]


def test_extract_is_refused_early_when_either_queue_is_full(bundles):
    async def scenario() -> None:
        app = create_app(make_settings(bundles, max_batch_size=1, max_queue=1, warmup=False))
        async with started(app) as http:
            model = HeldModel(app.state.engine.slots["re"].batcher)
            text, pair = "alice in paris", {"head_start": 0, "head_end": 5, "tail_start": 9, "tail_end": 14}
            first = asyncio.create_task(http.post("/re", data={"text": text, **pair}))
            await asyncio.to_thread(model.entered.wait, 10)
            second = asyncio.create_task(http.post("/re", data={"text": text, **pair}))
            await until(lambda: app.state.engine.slots["re"].batcher.depth == 1)
            refused = await http.post("/extract", data={"text": text})
            assert_clean_error(refused, 503)
            assert "re-batcher" in refused.json()["detail"]
            model.release()
            assert [(await first).status_code, (await second).status_code] == [200, 200]

    asyncio.run(scenario())


# --- queue order -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order, expected", [("fifo", ["b", "c", "d"]), ("adaptive", ["d", "c", "b"])])
def test_adaptive_order_answers_the_newest_first_once_the_oldest_has_waited(order, expected):
    ran: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def run_batch(items):
        ran.extend(items)
        entered.set()
        release.wait(10)
        return list(items)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(
                run_batch, pool, max_batch_size=1, max_wait_s=0, max_queue=8, order=order, lifo_after_s=0.05
            )
            batcher.start()
            try:
                first = asyncio.create_task(batcher.submit("a"))
                await asyncio.to_thread(entered.wait, 10)
                rest = []
                for item in ("b", "c", "d"):
                    rest.append(asyncio.create_task(batcher.submit(item)))
                    await until(lambda: batcher.depth == len(rest))
                await asyncio.sleep(0.1)  # the oldest has now waited past lifo_after_s
                release.set()
                await asyncio.gather(first, *rest)
            finally:
                release.set()
                await batcher.stop()

    asyncio.run(scenario())
    assert ran == ["a", *expected]


def test_a_request_cancelled_just_before_the_worker_reaches_it_is_skipped_and_counted_once():
    """A future cancelled a moment ago runs its done callback later: the worker must already see it
    as gone (neither answer it nor fail on it) and count its drop once."""
    ran: list[str] = []
    dropped: list[tuple[str, int]] = []
    entered, release = threading.Event(), threading.Event()

    def run_batch(items):
        ran.extend(items)
        entered.set()
        release.wait(10)
        return list(items)

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(
                run_batch,
                pool,
                max_batch_size=1,
                max_wait_s=0,
                max_queue=8,
                on_drop=lambda reason, rows: dropped.append((reason, rows)),
            )
            batcher.start()
            try:
                first = asyncio.create_task(batcher.submit("a"))
                await asyncio.to_thread(entered.wait, 10)
                doomed = asyncio.create_task(batcher.submit("b", deadline=time.monotonic() + 30))
                await until(lambda: batcher.depth == 1)
                # Its deadline passes and its future is cancelled, with no await between: its done
                # callback has not run when the worker looks at it.
                pending = batcher._queue[0]
                pending.deadline = time.monotonic() - 1
                pending.future.cancel()
                assert batcher._pop() is None and batcher.depth == 0  # skipped, not failed on
                release.set()
                await first
                with pytest.raises(asyncio.CancelledError):
                    await doomed
                assert (await batcher.submit("c"))[0] == "c"  # the worker lives on
            finally:
                release.set()
                await batcher.stop()

    asyncio.run(scenario())
    assert ran == ["a", "c"]
    assert dropped == [("deadline", 1)]


# --- the heap of a serving process ----------------------------------------------------------------


def test_a_serving_process_freezes_its_heap_once_its_models_are_loaded(bundles):
    """``python -m service`` and Ray replicas (``freeze_heap=True``): the objects alive once the
    models are loaded leave the collector's reach, so a full collection no longer walks them while
    holding the GIL; an app inside someone else's process (the default) leaves their heap alone."""
    import gc

    async def scenario(freeze_heap: bool) -> int:
        app = create_app(make_settings(bundles, re_bundle=None, warmup=False), freeze_heap=freeze_heap)
        async with started(app) as http:
            assert (await http.post("/ner", data={"text": "alice in paris"})).status_code == 200
            if freeze_heap:
                await until(lambda: gc.get_freeze_count() > 0)
            return gc.get_freeze_count()

    gc.unfreeze()
    try:
        assert asyncio.run(scenario(freeze_heap=False)) == 0
        frozen = asyncio.run(scenario(freeze_heap=True))
        assert frozen > 10_000  # the models' modules and objects, not a handful
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
