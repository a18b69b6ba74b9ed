"""Hostile and unlucky inputs against the service (issue 15): text no word of which fits the window,
failures that must stay with their own request, errors with the right status, memory per picture,
shutdown with requests still queued.

Each test here failed on the service before the fix it guards.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from engine import InvalidInput
from service import create_app
from tests.conftest import HeldModel
from tests.test_service import (
    ServerThread,
    assert_clean_error,
    make_settings,
    metric_value,
    started,
)

# Texts with a first "word" of more word pieces than the window (126) holds.
NO_WORD_FITS = {
    "chinese": "北京欢迎你我们明天在上海见面吧" * 20,  # 300 characters without a space: one word
    "japanese": "東京でアリスとボブに会いましょう" * 20,
    "thai": "ไทย." * 130,  # Thai words joined by periods: one word, a piece per word and per period
    "dots": "." * 127,
    "hashtag": "#" + "_".join(["go"] * 150),
    "dots_then_words": "." * 300 + " alice smith in paris",
}


@pytest.fixture(scope="module")
def server(bundles) -> Iterator[tuple[str, Any]]:
    # A long batch wait: concurrent requests land in one batch.
    app = create_app(make_settings(bundles, max_batch_size=16, batch_wait_ms=50))
    with ServerThread(app) as url:
        yield url, app


# --- 1. text no word of which fits the window -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NO_WORD_FITS))
def test_text_whose_first_word_outgrows_the_window_is_answered_on_its_first_pieces(server, client, name):
    text = NO_WORD_FITS[name]
    answer = client.post("/ner", data={"text": text})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["truncated"] is True
    for entity in body["entities"]:
        assert text[entity["start"] : entity["end"]] == entity["text"] and entity["text"]
    # The pieces of the cut word are words for /re: offsets may fall on their boundaries.
    words = server[1].state.engine.slots["re"].pipeline.words(text)
    head, tail = words[0], words[2]
    offsets = {"head_start": head[1], "head_end": head[2], "tail_start": tail[1], "tail_end": tail[2]}
    relation = client.post("/re", data={"text": text, **offsets})
    assert relation.status_code == 200, relation.text
    assert relation.json()["truncated"] is True


def test_split_long_words_cuts_only_words_longer_than_the_window(server):
    from model.preprocessing import split_words

    encoder = server[1].state.engine.slots["ner"].pipeline.preprocessor.text
    text = "alice " + NO_WORD_FITS["chinese"] + " #" + "_".join(["go"] * 150) + " bob"
    words = split_words(text)
    cut = encoder.split_long_words(words)
    assert cut[0] == words[0] and cut[-1] == words[-1]  # short words unchanged
    assert len(cut) > 300
    for word, start, end in cut:
        assert text[start:end] == word and word
    # The parts cover the text's words exactly, in order.
    assert "".join(w for w, _, _ in cut) == "".join(w for w, _, _ in words)
    assert all(len(encoder.encode([w]).input_ids) - 2 <= encoder.budget for w, _, _ in cut)
    # A long Chinese sentence is read character by character (a piece per character).
    chinese = [w for w, s, _ in cut if 6 <= s < 6 + 300]
    assert chinese == list(NO_WORD_FITS["chinese"])


def test_a_batch_with_text_that_outgrows_the_window_answers_every_request(server):
    url, _ = server
    before = httpx.get(f"{url}/metrics").text

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            calls = [http.post("/ner", data={"text": NO_WORD_FITS[name]}) for name in sorted(NO_WORD_FITS)]
            calls += [http.post("/ner", data={"text": f"alice smith {n} in paris"}) for n in range(15)]
            return await asyncio.gather(*calls)

    answers = asyncio.run(all_at_once())
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers if a.is_error]
    after = httpx.get(f"{url}/metrics").text
    requests = len(answers)
    batches = metric_value(after, "imm_batch_size_count") - metric_value(before, "imm_batch_size_count")
    assert batches < requests, "the requests were never batched together: the test proves nothing"


# --- 1. whatever one request raises, only that request fails -----------------------------------------


def test_a_request_that_raises_fails_alone_and_its_batch_mates_are_answered(bundles):
    """A fault in one row (a bug: 500; a fault of its input: its 4xx) never fails the rest of the batch."""

    async def scenario() -> None:
        app = create_app(make_settings(bundles, re_bundle=None, max_batch_size=16, batch_wait_ms=200))
        async with started(app) as http:
            batcher = app.state.engine.slots["ner"].batcher
            run_batch = batcher.run_batch
            sizes: list[int] = []

            def faulty(items):
                sizes.append(len(items))
                for item in items:
                    if "bug" in item.text:
                        raise RuntimeError("a bug in decoding")
                    if "bad" in item.text:
                        raise InvalidInput("text", "this text cannot be read")
                return run_batch(items)

            batcher.run_batch = faulty
            texts = [f"alice smith {n} in paris" for n in range(14)] + ["bug alice", "bad bob"]
            answers = await asyncio.gather(*(http.post("/ner", data={"text": t}) for t in texts))
            statuses = {t: a.status_code for t, a in zip(texts, answers)}
            assert statuses.pop("bug alice") == 500
            assert_clean_error(answers[-1], 422, "text")
            assert statuses.pop("bad bob") == 422
            assert set(statuses.values()) == {200}
            assert max(sizes) > 2, "the requests were never batched together: the test proves nothing"

    asyncio.run(scenario())


# --- 6. errors that say what happened ------------------------------------------------------------------


@pytest.fixture(scope="module")
def roomy_app(bundles):
    """NER only, with a 3 MiB body limit: room for a text part over the multipart parser's 1 MiB."""
    return create_app(make_settings(bundles, re_bundle=None, warmup=False, max_upload_bytes=3 * 1024 * 1024))


def _multipart(*parts: tuple[str, bytes], boundary: str = "xyz", close: bool = True) -> tuple[bytes, dict]:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
        for name, value in parts
    )
    body += f"--{boundary}--\r\n".encode() if close else b""
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_errors_name_their_cause_with_the_right_status(roomy_app):
    async def scenario() -> None:
        async with started(roomy_app) as http:

            async def post(body_and_headers: tuple[bytes, dict]) -> httpx.Response:
                body, headers = body_and_headers
                return await http.post("/ner", content=body, headers=headers)

            # A text part over 1 MiB (and over max_text_chars): 413, not the parser's 400.
            big = await post(_multipart(("text", b"alice " * 200_000)))
            assert_clean_error(big, 413)
            assert "limit" in big.json()["detail"]
            # ... refused as soon as it passes what max_text_chars can take (4 bytes a character):
            # form parsing runs on the event loop, it must not read megabytes of text.
            pulled = 0

            async def streamed() -> Any:
                nonlocal pulled
                yield b'--xyz\r\nContent-Disposition: form-data; name="text"\r\n\r\n'
                for _ in range(300):  # 3 MB
                    pulled += 1
                    yield b"alice " * 1000 + b"abcd"
                yield b"\r\n--xyz--\r\n"

            cut_off = await http.post("/ner", content=streamed(), headers=_multipart()[1])
            assert_clean_error(cut_off, 413)
            assert pulled <= 4 * 25_000 // 6004 + 2, f"the server read {pulled} of 300 chunks"
            # Text that is not UTF-8 is refused, never read as Latin-1 (offsets into another string).
            latin1 = await post(_multipart(("text", "café in Paris".encode("latin-1"))))
            assert_clean_error(latin1, 422, "text")
            assert "utf-8" in latin1.json()["detail"][0]["msg"]
            form = {"content-type": "application/x-www-form-urlencoded"}
            for body in (b"text=caf%E9+in+Paris", "text=café in Paris".encode("latin-1")):
                assert_clean_error(await http.post("/ner", content=body, headers=form), 422, "text")
            # UTF-8, raw or %-escaped, multipart or URL-encoded, is read as sent.
            text = "café alice à paris"
            for body, headers in (
                _multipart(("text", text.encode())),
                (("text=" + text.replace(" ", "+")).encode(), form),
                (b"text=caf%C3%A9+alice+%C3%A0+paris", form),
            ):
                answer = await http.post("/ner", content=body, headers=headers)
                assert answer.status_code == 200, answer.text
                for entity in answer.json()["entities"]:
                    assert text[entity["start"] : entity["end"]] == entity["text"]
            # An image sent as a text field ("image=null"): a 422 that says so, not a type name.
            for answer in (
                await http.post("/ner", data={"text": "alice", "image": "null"}),
                await post(_multipart(("text", b"alice"), ("image", b"null"))),
            ):
                assert_clean_error(answer, 422, "image")
                message = answer.json()["detail"][0]["msg"]
                assert "must be a file" in message and "UploadFile" not in message and "class" not in message
            # A multipart body cut before its closing boundary is a broken body (400), not a missing field.
            cut = await post(_multipart(("text", b"alice in paris"), close=False))
            assert_clean_error(cut, 400)
            assert "boundary" in cut.json()["detail"]
            no_boundary = await http.post(
                "/ner", content=b"text", headers={"content-type": "multipart/form-data"}
            )
            assert_clean_error(no_boundary, 400)
            # ... and the 400 is in the OpenAPI schema with the others.
            schema = (await http.get("/openapi.json")).json()
            for path in ("/ner", "/re"):
                assert {"400", "413", "422", "503"} <= set(schema["paths"][path]["post"]["responses"])

    asyncio.run(scenario())


# --- 5. shutdown past the grace period ----------------------------------------------------------------


def test_requests_still_waiting_when_the_grace_period_ends_get_a_json_503(bundles):
    """uvicorn gives requests in flight a grace period, then cancels them: each gets the documented
    JSON 503 with Retry-After (not uvicorn's plain-text 500), and the server stops within the bound."""
    import time

    import uvicorn

    grace = 1.0
    app = create_app(
        make_settings(bundles, re_bundle=None, max_batch_size=1, inference_workers=1, warmup=False)
    )
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=grace,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    assert app.state.engine.loaded.wait(60)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    batcher = app.state.engine.slots["ner"].batcher
    model = HeldModel(batcher)  # the model is stuck on the first batch past the grace period

    async def scenario() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            calls = [asyncio.create_task(http.post("/ner", data={"text": f"alice {n}"})) for n in range(5)]
            await asyncio.to_thread(model.entered.wait, 10)
            waiting = time.monotonic() + 10
            while batcher.depth < 4:  # one request in the running batch, four queued behind it
                assert time.monotonic() < waiting, f"{batcher.depth} requests queued, not 4"
                await asyncio.sleep(0.01)
            server.should_exit = True
            started = time.monotonic()
            answers = await asyncio.gather(*calls)
            return answers, time.monotonic() - started

    try:
        answers, waited = asyncio.run(scenario())
        thread.join(10)
        stopped = not thread.is_alive()
    finally:
        model.release()
        thread.join(30)
    for answer in answers:
        assert_clean_error(answer, 503)
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["retry-after"] == "1"
        assert "shutting down" in answer.json()["detail"]
    assert grace <= waited < grace + 5, f"answered after {waited:.1f} s"
    assert stopped, "the server did not stop within 10 s of the grace period's end"
