"""The inference service on small exported bundles: answers, offsets, bad input, batching, limits.

A uvicorn server runs in a thread of the test process (real HTTP on loopback) for most tests;
tests that change settings start their own app in-process. Two tests run a separate process:
one checks that serving never imports torch, one runs ``python -m service`` itself.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from model.preprocessing import split_words
from service import Settings, create_app
from tests.conftest import HeldModel, jpeg_bytes, synthetic_ner_examples, synthetic_re_examples
from tests.test_server import wait_ready

ROOT = Path(__file__).resolve().parents[1]
MAX_UPLOAD = 200_000
MAX_PIXELS = 2_000_000

# Texts with astral emoji (ZWJ sequences, flags, skin tones), combining marks, right-to-left and
# CJK scripts, zero-width spaces and odd whitespace around words the tiny models know.
TRICKY_TEXTS = [
    "RT @fan: alice smith 👩‍👩‍👧‍👦 in paris 🇫🇷 with the lakers!! #win http://t.co/x",
    "Jose\u0301 e\u0301 cafe\u0301 — bob jones à london 😂😂 #ca\u0301fe today",
    "مرحبا carol في tokyo 🏀 مع knicks",
    "dave lee सिंह नमस्ते berlin 中文 テスト madrid\u200bbulls !",
    "  erin\t\tbrown\n\nin  madrid…  frank👍🏽 celtics  ",
]


# --- fixtures ----------------------------------------------------------------------------------


def make_settings(bundles: dict[str, Path], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "ner_bundle": bundles["ner"],
        "re_bundle": bundles["re"],
        "max_batch_size": 8,
        "batch_wait_ms": 5,
        "max_queue": 512,
        "max_upload_bytes": MAX_UPLOAD,
        "max_image_pixels": MAX_PIXELS,
        "intra_op_threads": 1,
        "preprocess_threads": 2,
        "api_key": None,
    }
    values.update(overrides)
    return Settings(**values)


class ServerThread:
    """uvicorn serving an app on a free loopback port, in a daemon thread."""

    def __init__(self, app, http: Any = "auto"):
        import uvicorn

        self.app = app
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on", http=http
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:  # uvicorn has no event to wait on
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        assert self.app.state.engine.loaded.wait(60), "the models did not load"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(bundles) -> Iterator[tuple[str, Any]]:
    app = create_app(make_settings(bundles))
    with ServerThread(app) as url:
        yield url, app


@asynccontextmanager
async def started(app) -> AsyncIterator[httpx.AsyncClient]:
    """An app started in-process (lifespan, models loaded) and a client talking to it over ASGI."""
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(app.state.engine.loaded.wait, 60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=30) as http:
            yield http


def image_file(data: bytes, name: str = "photo.jpg", kind: str = "image/jpeg") -> dict:
    return {"image": (name, data, kind)}


def entity_spans(answer: dict) -> list[tuple[str, int, int]]:
    return [(e["type"], e["start"], e["end"]) for e in answer["entities"]]


def offsets_of(text: str, head_word: int, tail_word: int) -> dict[str, int]:
    words = split_words(text)
    return {
        "head_start": words[head_word][1],
        "head_end": words[head_word][2],
        "tail_start": words[tail_word][1],
        "tail_end": words[tail_word][2],
    }


def assert_clean_error(answer: httpx.Response, status: int, field: str | None = None) -> None:
    """The status, a request id, a JSON body naming ``field`` (422), and no traceback."""
    assert answer.status_code == status, answer.text
    assert answer.headers["x-request-id"]
    body = answer.json()
    assert body["request_id"] == answer.headers["x-request-id"]
    assert "Traceback" not in answer.text and 'File "' not in answer.text
    if field is not None:
        assert field in [item["loc"][-1] for item in body["detail"]], body


# --- answers, offsets and parity with model.evaluate -------------------------------------------


@pytest.fixture(scope="module")
def torch_models(trained_ner_checkpoint, trained_re_checkpoint):
    from model.checkpoint import load_checkpoint

    return {"ner": load_checkpoint(trained_ner_checkpoint), "re": load_checkpoint(trained_re_checkpoint)}


def expected_ner(torch_models, texts: list[str], image_dir: Path | None, image_ids: list[str | None]):
    """What ``model.evaluate`` predicts for the words of each text, as character spans of that text."""
    from model.data import NERExample
    from model.data.images import ImageStore
    from model.decoding import bio_spans, char_spans
    from model.evaluate import predict

    model, preprocessor = torch_models["ner"]
    examples = []
    for text, image_id in zip(texts, image_ids):
        words = tuple(w for w, _, _ in split_words(text))
        examples.append(NERExample(words=words, tags=("O",) * len(words), image_id=image_id))
    predictions = predict(
        model, preprocessor, examples, ImageStore(image_dir, preprocessor.image), batch_size=8
    )
    return [
        char_spans(bio_spans(tags), [(s, e) for _, s, e in split_words(text)])
        for text, tags in zip(texts, predictions)
    ]


def test_ner_answers_equal_model_evaluate_on_dataset_tweets(client, torch_models, tmp_path):
    """A dataset tweet joined by single spaces gets its own tokens back, and evaluate's predictions."""
    examples = synthetic_ner_examples(30, seed=11)
    pictures = {f"{n}.jpg": jpeg_bytes(160, 120, seed=n) for n in range(3)}
    for name, data in pictures.items():
        (tmp_path / name).write_bytes(data)
    texts = [" ".join(e.words) for e in examples]
    image_ids = [f"{n % 3}.jpg" if n % 3 == 0 else None for n in range(len(texts))]
    for example, text in zip(examples, texts):
        assert tuple(w for w, _, _ in split_words(text)) == example.words
    expected = expected_ner(torch_models, texts, tmp_path, image_ids)
    found = 0
    for text, image_id, spans in zip(texts, image_ids, expected):
        files = image_file(pictures[image_id]) if image_id else None
        answer = client.post("/ner", data={"text": text}, files=files)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert entity_spans(body) == spans, text
        assert body["image_used"] is (image_id is not None) and body["truncated"] is False
        found += len(spans)
    assert found >= len(texts) // 2  # the tiny model does find entities: the comparison is not vacuous


def test_ner_offsets_on_tricky_unicode_match_evaluate(client, torch_models):
    expected = expected_ner(torch_models, TRICKY_TEXTS, None, [None] * len(TRICKY_TEXTS))
    after_astral = 0
    for text, spans in zip(TRICKY_TEXTS, expected):
        body = client.post("/ner", data={"text": text}).json()
        assert entity_spans(body) == spans, text
        for entity in body["entities"]:
            assert text[entity["start"] : entity["end"]] == entity["text"]
            assert 0 < entity["score"] <= 1
            after_astral += any(ord(c) > 0xFFFF for c in text[: entity["start"]])
        assert body["model"] == body["model"].strip() and "@" in body["model"]
    # Code-point offsets after astral characters (UTF-16 or byte offsets would differ there).
    assert after_astral >= 2


def test_re_answers_equal_model_evaluate_with_unicode_offsets(client, torch_models):
    from model.data import REExample
    from model.evaluate import predict

    model, preprocessor = torch_models["re"]
    cases = [(" ".join(e.words), e.head[0], e.tail[0]) for e in synthetic_re_examples(12, seed=5)]
    cases += [
        ("🎉👩‍👩‍👧 alice 😂 moved to paris 🇫🇷 #win", 2, 6),
        ("مرحبا bob في knicks 🏀 e\u0301te\u0301", 1, 3),
    ]
    examples = []
    for text, head, tail in cases:
        words = tuple(w for w, _, _ in split_words(text))
        examples.append(
            REExample(
                words=words, head=(head, head + 1), tail=(tail, tail + 1), relation="None", image_id=None
            )
        )
    expected = predict(model, preprocessor, examples, batch_size=8)
    for (text, head, tail), relation in zip(cases, expected):
        answer = client.post("/re", data={"text": text, **offsets_of(text, head, tail)})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["relation"] == relation, text
        assert body["score"] == max(body["scores"].values())
        assert abs(sum(body["scores"].values()) - 1) < 1e-4
        assert set(body["scores"]) == set(model.config.labels)


def test_image_is_used_and_docs_health_ready_metrics_answer(server, client):
    photo = jpeg_bytes(1200, 900, quality=60)
    answer = client.post("/ner", data={"text": "bob in london"}, files=image_file(photo))
    assert answer.status_code == 200 and answer.json()["image_used"] is True
    # The service decodes through the shared ImageProcessor: JPEG in draft mode, never at full size.
    decoded = server[1].state.engine.slots["ner"].pipeline.preprocessor.image.load(photo)
    assert decoded.size[0] < 1200 and decoded.size[0] >= 224
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["models"]["ner"]["provider"] == "CPUExecutionProvider"
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/ner", "/re", "/health", "/ready", "/metrics"} <= set(schema["paths"])
    assert "example" in json.dumps(schema["components"]["schemas"]["NERResponse"])
    metrics = client.get("/metrics").text
    for stage in ("decode", "tokenise", "queue_wait", "inference", "total"):
        assert f'imm_stage_seconds_count{{stage="{stage}",task="ner"}}' in metrics
    assert 'imm_requests_total{endpoint="/ner",status="200"}' in metrics


# --- bad input -----------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels in a few bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def plain_image(width: int, height: int, kind: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buffer, format=kind)
    return buffer.getvalue()


def damaged_png() -> bytes:
    data = bytearray(io.BytesIO(jpeg_to_png(jpeg_bytes(64, 48))).getvalue())
    start = data.index(b"IDAT") + 20
    data[start : start + 40] = b"\x00" * 40
    return bytes(data)


def jpeg_to_png(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("files", "status"),
    [
        (image_file(b"hello, not a picture", "notes.txt", "text/plain"), 415),
        (image_file(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "doc.pdf", "application/pdf"), 415),
        (image_file(b"", "empty.jpg"), 415),
        (image_file(jpeg_bytes(160, 120)[:1500]), 422),  # truncated
        (image_file(damaged_png(), "broken.png", "image/png"), 422),  # corrupt data
        (image_file(plain_image(1800, 1200)), 413),  # 2.16 Mpx > the 2 Mpx limit
        (image_file(png_header(60_000, 60_000), "bomb.png", "image/png"), 413),  # decompression bomb
        (image_file(png_header(1_500, 1_500), "big.png", "image/png"), 413),  # over our limit, not Pillow's
    ],
)
def test_bad_images_get_their_status_and_never_a_traceback(client, files, status):
    answer = client.post("/ner", data={"text": "alice in paris"}, files=files)
    assert_clean_error(answer, status, "image")
    relation = client.post(
        "/re", data={"text": "alice in paris", **offsets_of("alice in paris", 0, 2)}, files=files
    )
    assert_clean_error(relation, status, "image")


def test_oversized_upload_is_refused_with_413(client):
    answer = client.post("/ner", data={"text": "alice"}, files=image_file(os.urandom(MAX_UPLOAD + 10)))
    assert_clean_error(answer, 413)
    assert "limit" in answer.json()["detail"]


def test_oversized_streamed_upload_is_cut_without_reading_it_all(bundles):
    """No Content-Length: the body is counted while it streams and refused once past the limit."""
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        boundary = b"--xyz\r\n"
        yield boundary + b'Content-Disposition: form-data; name="text"\r\n\r\nalice\r\n'
        yield boundary + b'Content-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        for _ in range(1000):  # 10 MB in all
            pulled += 1
            yield b"\xff" * 10_000

    async def scenario() -> httpx.Response:
        app = create_app(make_settings(bundles, re_bundle=None, warmup=False))
        async with started(app) as http:
            return await http.post(
                "/ner", content=body(), headers={"content-type": "multipart/form-data; boundary=xyz"}
            )

    answer = asyncio.run(scenario())
    assert_clean_error(answer, 413)
    assert pulled <= MAX_UPLOAD // 10_000 + 2, f"the server read {pulled} of 1000 chunks"


@pytest.mark.parametrize("text", ["", "   ", " \t\n\u200b\u3000 "])
def test_empty_or_whitespace_text_is_422(client, text):
    assert_clean_error(client.post("/ner", data={"text": text}), 422, "text")
    assert_clean_error(
        client.post("/re", data={"text": text, **dict.fromkeys(offsets_of("a b", 0, 1), 0)}), 422, "text"
    )


def test_text_over_the_window_is_answered_on_its_first_window(client):
    words = ["alice", "in", "paris", "with", "the", "lakers", "today"] * 60  # 420 words, window 126 pieces
    text = "🏀 ".join(words)
    body = client.post("/ner", data={"text": text}).json()
    assert body["truncated"] is True
    window_end = split_words(text)[126][1]  # at most 126 words fit between [CLS] and [SEP]
    assert body["entities"] and all(e["end"] <= window_end for e in body["entities"])
    short = client.post("/ner", data={"text": " ".join(words[:20])}).json()
    assert short["truncated"] is False
    relation = client.post("/re", data={"text": text, **offsets_of(text, 0, 500)})
    assert relation.status_code == 200 and relation.json()["truncated"] is True


def test_text_over_the_character_limit_is_413(client):
    assert_clean_error(client.post("/ner", data={"text": "a " * 20_000}), 413)


RE_TEXT = "alice smith moved to paris 🇫🇷 !"


@pytest.mark.parametrize(
    ("offsets", "field"),
    [
        ({"head_start": -1}, "head_start"),
        ({"tail_end": len(RE_TEXT) + 1}, "tail_end"),
        ({"head_start": 50, "head_end": 60}, "head_start"),
        ({"head_end": 0}, "head_end"),  # empty
        ({"tail_start": 21, "tail_end": 21}, "tail_end"),  # empty
        ({"tail_start": 6, "tail_end": 17}, "tail_start"),  # crosses the head ("smith moved")
        (
            {"tail_start": 0, "tail_end": 11},
            "tail_start",
        ),  # the head's words (nested spans: tests/test_extract.py)
        ({"head_start": 11, "head_end": 12}, "head_start"),  # only a space
        ({"head_start": 2}, "head_start"),  # inside "alice"
        ({"tail_end": 23}, "tail_end"),  # inside "paris"
        ({"head_start": "zero"}, "head_start"),  # not an integer
    ],
)
def test_bad_relation_offsets_are_422_naming_the_field(client, offsets, field):
    data = {"text": RE_TEXT, "head_start": 0, "head_end": 11, "tail_start": 21, "tail_end": 26, **offsets}
    assert_clean_error(client.post("/re", data=data), 422, field)


def test_missing_fields_are_422_naming_them(client):
    assert_clean_error(client.post("/ner", data={"other": "x"}), 422, "text")
    assert_clean_error(client.post("/ner", files=image_file(jpeg_bytes(32, 32))), 422, "text")
    answer = client.post("/re", data={"text": RE_TEXT, "head_start": 0, "head_end": 11, "tail_start": 21})
    assert_clean_error(answer, 422, "tail_end")
    # No body, or one without a form or JSON content type: a 415 naming both (tests/test_json_bodies.py).
    for answer in (client.post("/ner"), client.post("/ner", content=b"text=alice")):
        assert_clean_error(answer, 415)
        assert (
            "multipart/form-data" in answer.json()["detail"] and "application/json" in answer.json()["detail"]
        )


# --- batching, queue, key, availability ---------------------------------------------------------


def metric_value(metrics: str, name: str, **labels: str) -> float:
    pattern = re.escape(name) + r"\{([^}]*)\} ([0-9.e+-]+)"
    total = 0.0
    for found in re.finditer(pattern, metrics):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if all(pairs.get(k) == v for k, v in labels.items()):
            total += float(found.group(2))
    return total


def test_200_concurrent_requests_are_batched_and_equal_sequential_answers(server, client):
    url, _ = server
    photos = [jpeg_bytes(320, 240, seed=s) for s in range(2)]
    texts = [" ".join(e.words) for e in synthetic_ner_examples(10, seed=3)] + TRICKY_TEXTS[:2]
    requests: list[tuple[str, dict, dict | None]] = [("/ner", {"text": t}, None) for t in texts]
    requests += [("/ner", {"text": t}, image_file(photos[n % 2])) for n, t in enumerate(texts[:6])]
    for example in synthetic_re_examples(6, seed=9):
        text = " ".join(example.words)
        requests.append(("/re", {"text": text, **offsets_of(text, example.head[0], example.tail[0])}, None))
    sequential = []
    for path, data, files in requests:
        answer = client.post(path, data=data, files=files)
        assert answer.status_code == 200
        sequential.append(answer.json())
    before = client.get("/metrics").text

    async def all_at_once() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            calls = [
                http.post(p, data=d, files=f) for p, d, f in (requests[n % len(requests)] for n in range(200))
            ]
            return await asyncio.gather(*calls)

    answers = asyncio.run(all_at_once())
    assert [a.status_code for a in answers] == [200] * 200
    # Identical to one-at-a-time answers; scores (rounded to 6 digits) may differ by one rounding step.
    for n, answer in enumerate(answers):
        got, want = answer.json(), sequential[n % len(requests)]
        for entity in want.get("entities", []):
            entity["score"] = pytest.approx(entity["score"], abs=1e-6)
        if "scores" in want:
            want["score"] = pytest.approx(want["score"], abs=1e-6)
            want["scores"] = pytest.approx(want["scores"], abs=1e-6)
        assert got == want
    after = client.get("/metrics").text
    batches = metric_value(after, "imm_batch_size_count") - metric_value(before, "imm_batch_size_count")
    singles = metric_value(after, "imm_batch_size_bucket", le="1.0") - metric_value(
        before, "imm_batch_size_bucket", le="1.0"
    )
    assert 0 < batches < 200 and singles < batches, "the batcher never ran a batch of more than one"


def test_a_full_queue_answers_503_with_retry_after(bundles):
    async def scenario() -> None:
        app = create_app(
            make_settings(
                bundles, re_bundle=None, max_queue=1, max_batch_size=1, inference_workers=1, warmup=False
            )
        )
        async with started(app) as http:
            batcher = app.state.engine.slots["ner"].batcher
            model = HeldModel(batcher)
            try:
                first = asyncio.create_task(http.post("/ner", data={"text": "alice in paris"}))
                await asyncio.to_thread(model.entered.wait, 10)
                second = asyncio.create_task(http.post("/ner", data={"text": "bob in london"}))
                deadline = time.monotonic() + 10
                while batcher.depth < 1:  # the second request is queued behind the first
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.001)
                refused = await http.post("/ner", data={"text": "carol in tokyo"})
                assert_clean_error(refused, 503)
                assert (
                    refused.headers["retry-after"] in {"1", "2"}
                    and "queue is full" in refused.json()["detail"]
                )
            finally:
                model.release()
            assert (await first).status_code == 200 and (await second).status_code == 200
            metrics = (await http.get("/metrics")).text
            assert metric_value(metrics, "imm_rejected_total", model="ner") == 1

    asyncio.run(scenario())


def test_api_key(bundles):
    async def scenario() -> None:
        app = create_app(make_settings(bundles, re_bundle=None, api_key="s3cret", warmup=False))
        async with started(app) as http:
            assert_clean_error(await http.post("/ner", data={"text": "alice"}), 401)
            wrong = await http.post("/ner", data={"text": "alice"}, headers={"Authorization": "Bearer guess"})
            assert_clean_error(wrong, 401)
            right = await http.post(
                "/ner", data={"text": "alice"}, headers={"Authorization": "Bearer s3cret"}
            )
            assert right.status_code == 200 and "entities" in right.json()
            assert (await http.get("/ready")).status_code == 200
            schema = (await http.get("/openapi.json")).json()
            assert "HTTPBearer" in schema["components"]["securitySchemes"]

    asyncio.run(scenario())


def test_a_missing_or_broken_bundle_disables_only_its_endpoint(bundles, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(bundles["re"], tampered)
    with open(tampered / "tokenizer.json", "a", encoding="utf-8") as handle:
        handle.write(" ")

    async def scenario() -> None:
        app = create_app(make_settings(bundles, re_bundle=tampered, warmup=False))
        async with started(app) as http:
            assert (await http.post("/ner", data={"text": "alice in paris"})).status_code == 200
            broken = await http.post("/re", data={"text": RE_TEXT, **offsets_of(RE_TEXT, 0, 4)})
            assert_clean_error(broken, 503)
            assert "does not match its manifest" in broken.json()["detail"]
            ready = (await http.get("/ready")).json()
            assert ready["ready"] is True and ready["models"]["re"]["status"] == "failed"
        app = create_app(make_settings(bundles, ner_bundle=tmp_path / "nowhere", re_bundle=None))
        async with started(app) as http:
            absent = await http.post("/ner", data={"text": "alice"})
            assert_clean_error(absent, 503)
            assert "nowhere does not exist" in absent.json()["detail"]
            disabled = await http.post("/re", data={"text": RE_TEXT, **offsets_of(RE_TEXT, 0, 4)})
            assert_clean_error(disabled, 404)  # switched off: a retry cannot help
            assert "IMM_RE_BUNDLE is empty" in disabled.json()["detail"]
            assert (await http.get("/ready")).status_code == 503
            assert (await http.get("/health")).status_code == 200

    asyncio.run(scenario())


# --- separate processes --------------------------------------------------------------------------


def _env(bundles: dict[str, Path], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMM_")}
    env.update(IMM_NER_BUNDLE=str(bundles["ner"]), IMM_RE_BUNDLE=str(bundles["re"]), IMM_INTRA_OP_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


TORCH_FREE_SCRIPT = """
import io, json, sys
from fastapi.testclient import TestClient
from PIL import Image
from service import create_app
photo = io.BytesIO()
Image.new("RGB", (640, 480), (200, 30, 90)).save(photo, format="JPEG")
with TestClient(create_app()) as client:
    assert client.app.state.engine.loaded.wait(60)
    ner = client.post("/ner", data={"text": "alice in paris"}, files={"image": ("a.jpg", photo.getvalue(), "image/jpeg")})
    rel = client.post("/re", data={"text": "alice in paris", "head_start": 0, "head_end": 5, "tail_start": 9, "tail_end": 14})
    statuses = [ner.status_code, rel.status_code]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "torchcrf", "safetensors"))
print(json.dumps({"statuses": statuses, "heavy": heavy}))
"""


@pytest.mark.parametrize("runtime", ["auto", "onnx"])
def test_serving_never_imports_torch(bundles, runtime):
    """Torch is installed here (the dev install): on a machine without a GPU, neither IMM_RUNTIME=onnx
    nor the default auto may import it."""
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_SCRIPT],
        env=_env(bundles, IMM_RUNTIME=runtime),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"statuses": [200, 200], "heavy": []}


@pytest.fixture()
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_python_m_service_serves_on_a_loopback_port(bundles, free_port):
    env = _env(bundles, IMM_HOST="127.0.0.1", IMM_PORT=str(free_port), IMM_MAX_BATCH_SIZE="4")
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{free_port}"
    try:
        # Its stderr can be read only once it has ended (a live process would block communicate()).
        wait_ready(
            url, process, lambda: process.communicate()[1][-3000:] if process.poll() is not None else "", 90
        )
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        answer = httpx.post(
            f"{url}/ner",
            data={"text": "alice smith in paris 🇫🇷"},
            files=image_file(jpeg_bytes(1200, 900, quality=60)),
            headers={"X-Request-ID": "e2e-check-1"},
            timeout=30,
        )
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "e2e-check-1"
        body = answer.json()
        assert body["image_used"] is True
        assert body["model"] == httpx.get(f"{url}/ready").json()["models"]["ner"]["name"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it (exit status -15, as Docker expects).
    assert process.returncode in (0, -signal.SIGTERM), stderr[-3000:]
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(line.get("message") == "Application shutdown complete." for line in lines)
    assert any("running on CPUExecutionProvider" in line.get("message", "") for line in lines)
    access = [line for line in lines if line.get("request_id") == "e2e-check-1"]
    assert access and access[0]["status"] == 200 and access[0]["path"] == "/ner"
