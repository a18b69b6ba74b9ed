"""The Python API and the server under misuse (issue 35): calls after ``close()`` raise, ``pipe`` over
a generator that calls the API works, many threads or a large batch wait their turn instead of being
refused, bad arguments are ``ValueError`` / ``imm.InvalidInput``, pictures are regular capped files,
a process that never closes exits cleanly; ``/ready`` names no server path without the API key and
every answer carries ``X-Content-Type-Options: nosniff``."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import imm
from export.bundle import BundleError, load_bundle
from service import create_app
from tests.conftest import jpeg_bytes
from tests.test_service import make_settings, started

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["alice smith in paris with the knicks", "bob jones visited london", "nothing here", "carol at tokyo"]


@pytest.fixture(scope="module")
def nlp(bundles):
    # A small queue, so that a few dozen threads or one pipe batch are far more than it admits.
    with imm.load(ner=bundles["ner"], re=bundles["re"], intra_op_threads=1, max_queue=4) as loaded:
        yield loaded


def answered_in_time(function, *args, seconds: float = 60):
    """``function(*args)``'s result, run in a thread: a call that blocks for ever fails the test."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result(seconds)


def test_a_call_after_close_raises(bundles):
    nlp = imm.load(ner=bundles["ner"], re="", intra_op_threads=1)
    assert nlp.ner(TEXTS[0]).entities
    nlp.close()
    with pytest.raises(imm.ShuttingDown, match="close"):
        answered_in_time(nlp.ner, TEXTS[0])
    with pytest.raises(imm.ShuttingDown):
        answered_in_time(lambda: list(nlp.pipe(TEXTS)))
    nlp.close()  # twice: nothing more to do


def test_pipe_over_a_generator_that_calls_the_api(nlp):
    def texts_with_their_entity_counts():
        for text in TEXTS:
            yield f"{text} ({len(nlp.ner(text).entities)})"  # a call from inside the iteration

    got = answered_in_time(lambda: list(nlp.pipe(texts_with_their_entity_counts(), "ner", batch_size=2)))
    assert got == [nlp.ner(f"{t} ({len(nlp.ner(t).entities)})") for t in TEXTS]


def test_more_calls_than_the_queue_holds_wait_instead_of_failing(nlp):
    texts = [TEXTS[i % len(TEXTS)] for i in range(200)]
    expected = {text: nlp.ner(text) for text in TEXTS}
    with ThreadPoolExecutor(64) as pool:  # 64 threads at once, against a queue of 4
        got = list(pool.map(nlp.ner, texts))
    assert got == [expected[text] for text in texts]
    assert list(nlp.pipe(texts, "ner", batch_size=150)) == got  # 150 in flight at once, the same way


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_a_batch_size_below_one_is_a_value_error(nlp, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        nlp.pipe(TEXTS, batch_size=batch_size)  # at the call, not at the first answer


def test_texts_that_are_not_unicode_strings_are_invalid_input(nlp):
    for text in ["truncated tweet \ud83d", 5, None]:
        with pytest.raises(imm.InvalidInput) as caught:
            nlp.ner(text)  # type: ignore[arg-type]
        assert caught.value.field == "text"
    # In a pipe, the lone surrogate is not tokenised to sort the batch: it is its call's error.
    with pytest.raises(imm.PipeError, match="^item 1: .*lone surrogate") as caught:
        list(nlp.pipe([TEXTS[0], "\ud83d"]))
    assert isinstance(caught.value.error, imm.InvalidInput)


def test_pictures_are_regular_files_within_the_upload_limit(bundles, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "large.jpg").write_bytes(jpeg_bytes(64, 48) + b"\0" * 2048)
    with imm.load(ner=bundles["ner"], re="", intra_op_threads=1, max_upload_bytes=1024) as small:
        for path in ("/dev/zero", fifo, tmp_path):
            with pytest.raises(ValueError, match="not a regular file"):
                answered_in_time(small.ner, TEXTS[0], path)
        with pytest.raises(imm.InputTooLarge, match="IMM_MAX_UPLOAD_BYTES"):
            small.ner(TEXTS[0], tmp_path / "large.jpg")
        with open("/dev/zero", "rb") as endless, pytest.raises(imm.InputTooLarge):
            small.ner(TEXTS[0], endless)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]"])
def test_a_broken_manifest_names_its_file(bundles, tmp_path, content):
    bundle = tmp_path / "ner"
    shutil.copytree(bundles["ner"], bundle)
    (bundle / "manifest.json").write_text(content)
    with pytest.raises(imm.ModelUnavailable, match=str(bundle / "manifest.json")):
        imm.load(bundle)
    with pytest.raises(BundleError, match=str(bundle / "manifest.json")):
        load_bundle(bundle)


@pytest.mark.parametrize("closing", ["", "with"])
def test_the_readme_snippet_exits_cleanly(bundles, closing):
    """Without close() (the models closed at exit) or with ``with``: no 'Task was destroyed'."""
    call = "print(nlp.ner('alice smith in paris').entities[0].type)"
    if closing:
        script = f"import imm, sys\nwith imm.load(sys.argv[1]) as nlp:\n    {call}\n"
    else:
        script = f"import imm, sys\nnlp = imm.load(sys.argv[1])\n{call}\n"
    done = subprocess.run(
        [sys.executable, "-c", script, str(bundles["ner"])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "IMM_INTRA_OP_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "PER"
    assert "Task was destroyed" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_ready_names_no_server_path_without_the_api_key(bundles, tmp_path):
    missing = tmp_path / "secret-place" / "re"

    async def scenario() -> None:
        app = create_app(make_settings(bundles, re_bundle=missing, api_key="s3cret"))
        async with started(app) as http:
            anonymous = (await http.get("/ready")).json()["models"]["re"]
            assert anonymous["status"] in ("absent", "failed")
            assert "secret-place" not in anonymous["detail"] and "/" not in anonymous["detail"]
            assert anonymous["detail"].startswith("the RE model is")
            keyed = await http.get("/ready", headers={"Authorization": "Bearer s3cret"})
            assert "secret-place" in keyed.json()["models"]["re"]["detail"]

    asyncio.run(scenario())


def test_every_answer_says_nosniff(bundles):
    async def scenario() -> None:
        app = create_app(make_settings(bundles, api_key="s3cret"))
        async with started(app) as http:
            key = {"Authorization": "Bearer s3cret"}
            answers: list[httpx.Response] = [
                await http.post("/ner", data={"text": "alice"}, headers=key),
                await http.post("/ner", data={"text": "alice"}),  # 401
                await http.post("/ner", data={"other": "x"}, headers=key),  # 422: no text field
                await http.get("/ready"),
                await http.get("/health"),
                await http.get("/metrics"),
                await http.get("/static/app.js"),
                await http.get("/openapi.json"),
                await http.get("/no-such-page"),
            ]
            for answer in answers:
                assert answer.headers.get("x-content-type-options") == "nosniff", answer.request.url
                assert answer.headers.get_list("x-content-type-options") == ["nosniff"]
            assert [a.status_code for a in answers[:3]] == [200, 401, 422]

    asyncio.run(scenario())


def test_threads_equal_one_at_a_time(nlp):
    """What held before (issue 35's "keep it"): calls from many threads answer as one at a time."""
    expected = [nlp.ner(text) for text in TEXTS]
    results: list = [None] * 16

    def worker(index: int) -> None:
        results[index] = [nlp.ner(text) for text in TEXTS]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == [expected] * 16
