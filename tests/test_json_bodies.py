"""JSON bodies on /ner, /re and /extract (as the form's fields, the picture in base64), their limits
and errors; empty text; other content types (415); a model switched off (404, and /extract without
relations); and the strict form parsers' hooks into Starlette's parsers, pinned."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from service import create_app
from service.errors import FieldError
from service.forms import StrictFormParser, StrictMultiPartParser, decode_base64
from tests.conftest import jpeg_bytes
from tests.test_service import (
    MAX_UPLOAD,
    assert_clean_error,
    image_file,
    make_settings,
    offsets_of,
    started,
)

TEXT = "alice smith is in paris with the lakers"
RE_TEXT = "alice moved to paris last year"
PHOTO = jpeg_bytes(320, 240, seed=5)
PHOTO_B64 = base64.b64encode(PHOTO).decode()
EMPTY_TEXT = "text is empty or only whitespace"


def without_timing(answer: httpx.Response) -> dict:
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture()
def app(bundles):
    return create_app(make_settings(bundles, warmup=False))  # one per test: started() closes its engine


def test_json_bodies_answer_as_forms_do(app):
    re_fields = {"text": RE_TEXT, **offsets_of(RE_TEXT, 0, 3)}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/ner", {"text": TEXT}),
        ("/re", re_fields),
        ("/extract", {"text": TEXT, "pairs": "all", "include_none": True}),
    ]

    async def scenario() -> None:
        async with started(app) as http:
            for path, fields in cases:
                form = {
                    key: str(value).lower() if isinstance(value, bool) else value
                    for key, value in fields.items()
                }
                plain = without_timing(await http.post(path, data=form))
                assert without_timing(await http.post(path, json=fields)) == plain, path
                with_photo = without_timing(await http.post(path, data=form, files=image_file(PHOTO)))
                assert with_photo["image_used"] is True
                sent = without_timing(await http.post(path, json={**fields, "image_base64": PHOTO_B64}))
                assert sent == with_photo, path
            # As a browser's FileReader gives it (a data: URL), or as base64(1) wraps it: the same picture.
            wrapped = "\n".join(PHOTO_B64[i : i + 76] for i in range(0, len(PHOTO_B64), 76))
            for image in ("data:image/jpeg;base64," + PHOTO_B64, wrapped):
                answer = await http.post("/ner", json={"text": TEXT, "image_base64": image})
                assert without_timing(answer)["image_used"] is True
            # No picture: null, an empty string, or the field left out.
            for body in ({"text": TEXT, "image_base64": None}, {"text": TEXT, "image_base64": ""}):
                assert without_timing(await http.post("/ner", json=body))["image_used"] is False
            # A charset parameter changes nothing (JSON is UTF-8).
            answer = await http.post(
                "/ner",
                content=json.dumps({"text": TEXT}).encode(),
                headers={"content-type": "application/json; charset=utf-8"},
            )
            assert answer.status_code == 200, answer.text

    asyncio.run(scenario())


def test_json_errors_name_their_field(app):
    async def scenario() -> None:
        async with started(app) as http:
            for image, status in (
                ("not base64!", 422),
                (PHOTO_B64[:-1], 422),  # padding cut
                ("data:image/jpeg," + PHOTO_B64, 422),  # a data: URL that is not base64
                ("é" + PHOTO_B64, 422),
                (base64.b64encode(b"hello, not a picture").decode(), 415),
                (base64.b64encode(PHOTO[: len(PHOTO) // 3]).decode(), 422),  # a truncated JPEG
            ):
                answer = await http.post("/ner", json={"text": TEXT, "image_base64": image})
                assert_clean_error(answer, status, "image_base64")
            bad_base64 = await http.post("/ner", json={"text": TEXT, "image_base64": "not base64!"})
            assert "not valid base64" in bad_base64.json()["detail"][0]["msg"]
            # The form's field name in JSON: a 422 saying where the picture goes.
            answer = await http.post("/ner", json={"text": TEXT, "image": PHOTO_B64})
            assert_clean_error(answer, 422, "image")
            assert "image_base64" in answer.json()["detail"][0]["msg"]
            # A misspelt field, a missing one, one of the wrong type: 422 naming each.
            assert_clean_error(await http.post("/ner", json={"txt": TEXT}), 422, "txt")
            assert_clean_error(await http.post("/ner", json={}), 422, "text")
            assert_clean_error(await http.post("/ner", json={"text": 5}), 422, "text")
            answer = await http.post("/re", json={"text": RE_TEXT, "head_start": 0, "head_end": "five"})
            assert_clean_error(answer, 422, "head_end")
            assert {"tail_start", "tail_end"} <= {item["loc"][-1] for item in answer.json()["detail"]}
            assert_clean_error(
                await http.post("/extract", json={"text": TEXT, "pairs": "some"}), 422, "pairs"
            )
            answer = await http.post("/extract", json={"text": TEXT, "include_none": "maybe"})
            assert_clean_error(answer, 422, "include_none")
            # Not JSON at all: a malformed body (400); JSON that is not an object: 422.
            for body in (b'{"text": "alice', b"text=alice", b'{"text": "caf\xe9"}'):
                answer = await http.post("/ner", content=body, headers={"content-type": "application/json"})
                assert_clean_error(answer, 400)
                assert "not valid JSON" in answer.json()["detail"]
            answer = await http.post("/ner", json=["alice"])
            assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body"]
            # The input is never echoed back (it may be megabytes).
            answer = await http.post("/ner", json={"text": TEXT, "image_base64": "x" * 5001})
            assert "xxxxx" not in answer.text

    asyncio.run(scenario())


def test_empty_text_gets_the_api_s_message_in_every_encoding(app):
    async def scenario() -> None:
        async with started(app) as http:
            for text in ("", "   ", " \u200b\n"):
                for path, extra in (("/ner", {}), ("/re", offsets_of(RE_TEXT, 0, 3)), ("/extract", {})):
                    fields = {"text": text, **extra}
                    for answer in (
                        await http.post(path, json=fields),
                        await http.post(path, data=fields),  # URL-encoded
                        await http.post(path, data=fields, files=image_file(PHOTO)),  # multipart
                    ):
                        assert_clean_error(answer, 422, "text")
                        assert answer.json()["detail"][0]["msg"] == EMPTY_TEXT, (path, text, answer.text)
            # Other empty form fields are fields left out, as FastAPI reads forms: no picture, the default.
            answer = await http.post(
                "/extract", data={"text": TEXT, "image": "", "pairs": "", "include_none": ""}
            )
            assert answer.status_code == 200 and answer.json()["image_used"] is False, answer.text
            # A text field left out is still "Field required".
            answer = await http.post("/ner", data={"other": "x"})
            assert_clean_error(answer, 422, "text")
            assert answer.json()["detail"][0]["type"] == "missing"

    asyncio.run(scenario())


def test_a_body_neither_form_nor_json_is_a_415_naming_both(app):
    async def scenario() -> None:
        async with started(app) as http:
            for headers, body in (
                ({"content-type": "text/plain"}, TEXT.encode()),
                ({"content-type": "application/xml"}, b"<text>alice</text>"),
                ({}, b""),
                ({}, TEXT.encode()),
            ):
                answer = await http.post("/ner", content=body, headers=headers)
                assert_clean_error(answer, 415)
                detail = answer.json()["detail"]
                assert "multipart/form-data" in detail and "application/json" in detail, detail

    asyncio.run(scenario())


def test_json_bodies_keep_the_limits(bundles):
    settings = make_settings(bundles, warmup=False, max_text_chars=200)

    async def scenario() -> None:
        async with started(create_app(settings)) as http:
            # Over IMM_MAX_UPLOAD_BYTES by its Content-Length: 413 before the body is read.
            big = json.dumps({"text": TEXT, "image_base64": "A" * MAX_UPLOAD}).encode()
            answer = await http.post("/ner", content=big, headers={"content-type": "application/json"})
            assert_clean_error(answer, 413)
            assert f"limit of {MAX_UPLOAD} bytes" in answer.json()["detail"]
            # ... and without one (chunked): cut off once past the limit, the rest unread.
            pulled = 0

            async def streamed() -> AsyncIterator[bytes]:
                nonlocal pulled
                yield b'{"text": "alice", "image_base64": "'
                for _ in range(100):
                    pulled += 1
                    yield b"A" * 10_000
                yield b'"}'

            answer = await http.post("/ner", content=streamed(), headers={"content-type": "application/json"})
            assert_clean_error(answer, 413)
            assert pulled < 100, f"the server read all {pulled} chunks"
            # The text limit, and the picture's pixel limit (the decoded picture, named by its field).
            answer = await http.post("/ner", json={"text": "alice " * 50})
            assert_clean_error(answer, 413)
            assert "limit of 200" in answer.json()["detail"]
            huge = jpeg_bytes(2000, 1200, seed=1, quality=20)  # 2.4 Mpx > MAX_PIXELS, small in bytes
            assert len(base64.b64encode(huge)) < MAX_UPLOAD
            answer = await http.post(
                "/ner", json={"text": TEXT, "image_base64": base64.b64encode(huge).decode()}
            )
            assert_clean_error(answer, 413, "image_base64")

    asyncio.run(scenario())


def test_openapi_shows_both_content_types(app):
    async def scenario() -> None:
        async with started(app) as http:
            schema = (await http.get("/openapi.json")).json()
            for path, fields in (
                ("/ner", {"text"}),
                ("/re", {"text", "head_start", "head_end", "tail_start", "tail_end"}),
                ("/extract", {"text", "pairs", "include_none"}),
            ):
                operation = schema["paths"][path]["post"]
                content = operation["requestBody"]["content"]
                form, body = content["multipart/form-data"]["schema"], content["application/json"]["schema"]
                assert set(form["properties"]) == fields | {"image"}, path
                assert set(body["properties"]) == fields | {"image_base64"}, path
                assert set(form["required"]) == set(body["required"]) == fields - {"pairs", "include_none"}
                assert body["additionalProperties"] is False
                assert {"400", "404", "413", "415", "422", "503"} <= set(operation["responses"])
                assert operation["parameters"][0]["name"] == "X-Request-Timeout"

    asyncio.run(scenario())


# --- a model switched off -------------------------------------------------------------------------


def test_a_switched_off_model_is_a_404_naming_its_setting(bundles, tmp_path):
    async def scenario() -> None:
        async with started(create_app(make_settings(bundles, re_bundle=None, warmup=False))) as http:
            answer = await http.post("/re", json={"text": RE_TEXT, **offsets_of(RE_TEXT, 0, 3)})
            assert_clean_error(answer, 404)
            assert "IMM_RE_BUNDLE" in answer.json()["detail"] and "retry-after" not in answer.headers
            # /extract answers the entities, and says that relations are off.
            alone = without_timing(await http.post("/extract", json={"text": TEXT}))
            entities = without_timing(await http.post("/ner", json={"text": TEXT}))["entities"]
            assert alone["entities"] == entities and entities and alone["relations"] == []
            assert alone["models"]["re"] is None and alone["models"]["ner"]
            assert any("relations are off" in note and "IMM_RE_BUNDLE" in note for note in alone["notes"])
            with_photo = without_timing(
                await http.post("/extract", data={"text": TEXT}, files=image_file(PHOTO))
            )
            assert with_photo["image_used"] is True and with_photo["relations"] == []
        async with started(create_app(make_settings(bundles, ner_bundle=None, warmup=False))) as http:
            for path in ("/ner", "/extract"):
                answer = await http.post(path, json={"text": TEXT})
                assert_clean_error(answer, 404)
                assert "IMM_NER_BUNDLE" in answer.json()["detail"], path
            assert (
                await http.post("/re", json={"text": RE_TEXT, **offsets_of(RE_TEXT, 0, 3)})
            ).status_code == 200
        # A bundle configured but missing is the server's fault, not a choice: still 503.
        app = create_app(make_settings(bundles, re_bundle=tmp_path / "nowhere", warmup=False))
        async with started(app) as http:
            for path in ("/re", "/extract"):
                answer = await http.post(path, json={"text": RE_TEXT, **offsets_of(RE_TEXT, 0, 3)})
                if path == "/extract":
                    answer = await http.post(path, json={"text": RE_TEXT})
                assert_clean_error(answer, 503)
                assert "nowhere does not exist" in answer.json()["detail"]

    asyncio.run(scenario())


# --- the strict parsers' hooks into Starlette's (pinned: they use the parsers' attributes) ----------


async def _parse(parser_class: type, content_type: str, body: bytes, **limits: Any):
    async def stream() -> AsyncIterator[bytes]:
        yield body

    headers = Headers({"content-type": content_type, "content-length": str(len(body))})
    return await parser_class(headers, stream(), **limits).parse()


def test_the_strict_parsers_still_hook_into_starlette_s():
    """Each overridden callback, on the installed Starlette: a failure here means an upgrade changed
    the parsers' internals (service/forms.py's StrictMultiPartParser, StrictFormParser)."""
    multipart = "multipart/form-data; boundary=b"

    def part(name: str, value: bytes) -> bytes:
        return f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"

    async def scenario() -> None:
        form = await _parse(StrictMultiPartParser, multipart, part("text", "café".encode()) + b"--b--\r\n")
        assert form["text"] == "café"
        with pytest.raises(HTTPException) as refused:  # on_part_end: strict decoding
            await _parse(
                StrictMultiPartParser, multipart, part("text", "café".encode("latin-1")) + b"--b--\r\n"
            )
        assert refused.value.status_code == 422 and refused.value.detail[0]["loc"] == ["body", "text"]
        with pytest.raises(HTTPException) as refused:  # on_part_data: the text limit
            await _parse(
                StrictMultiPartParser, multipart, part("text", b"a" * 100) + b"--b--\r\n", max_part_size=50
            )
        assert refused.value.status_code == 413 and "'text'" in refused.value.detail
        with pytest.raises(MultiPartException, match="closing boundary"):  # on_end: a complete body
            await _parse(StrictMultiPartParser, multipart, part("text", b"alice"))
        urlencoded = "application/x-www-form-urlencoded"
        form = await _parse(StrictFormParser, urlencoded, b"text=caf%C3%A9+alice")
        assert form["text"] == "café alice"
        with pytest.raises(HTTPException) as refused:  # on_field_end: strict decoding
            await _parse(StrictFormParser, urlencoded, b"text=caf%E9")
        assert refused.value.status_code == 422
        with pytest.raises(HTTPException) as refused:  # on_field_data: the text limit
            await _parse(StrictFormParser, urlencoded, b"text=" + b"a" * 100, max_part_size=50)
        assert refused.value.status_code == 413

    asyncio.run(scenario())


def test_decode_base64():
    assert decode_base64("image_base64", base64.b64encode(b"\x00\xffpicture").decode()) == b"\x00\xffpicture"
    assert decode_base64("image_base64", "data:image/png;base64,AAE=") == b"\x00\x01"
    assert decode_base64("image_base64", " AA\r\nE= ") == b"\x00\x01"
    assert decode_base64("image_base64", None) is None and decode_base64("image_base64", "") is None
    for bad in ("AAE", "A*E=", "data:,AAE=", "ÀAE="):
        with pytest.raises(FieldError) as refused:
            decode_base64("image_base64", bad)
        assert refused.value.field == "image_base64" and refused.value.status == 422


def test_a_client_gone_before_its_body_is_a_499_not_an_error(app, caplog):
    """A client that disconnects while its JSON or form body arrives: counted as 499, not logged
    as a server error."""

    async def send_request(content_type: bytes, first_chunk: bytes) -> list[dict]:
        sent: list[dict] = []
        messages = [
            {"type": "http.request", "body": first_chunk, "more_body": True},
            {"type": "http.disconnect"},
        ]

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/ner",
            "raw_path": b"/ner",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"service"), (b"content-type", content_type), (b"content-length", b"5000")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 80),
        }
        await app(scope, receive, send)
        return sent

    async def scenario() -> None:
        async with started(app):
            for content_type, chunk in (
                (b"application/json", b'{"text": "alice'),
                (
                    b"multipart/form-data; boundary=b",
                    b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nal',
                ),
            ):
                sent = await send_request(content_type, chunk)
                assert sent[0]["status"] == 499, (content_type, sent[0])

    with caplog.at_level("ERROR"):
        asyncio.run(scenario())
    assert not [record for record in caplog.records if record.levelname == "ERROR"], caplog.text
