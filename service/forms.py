"""Request bodies: a form (multipart or URL-encoded) or JSON, read into the route's fields; text that
is not valid in its charset is a 422 naming the field, never a guess.

``body_reader`` makes each inference route's dependency: it reads the body that the
``Content-Type`` names (another type is a 415 naming the accepted ones) and validates it into the
path's fields (``service.schemas``), a picture sent as a file part ``image`` in a form and as base64
in ``image_base64`` in JSON. Both go through the same guard (``service.guard``: the body limit as
declared and as received, the body deadline) and the same upload budget.

Starlette reads a text field that does not decode in the request's charset (UTF-8 unless the
``Content-Type`` says otherwise) as Latin-1, and a URL-encoded form as Latin-1 always, with
``%XX`` escapes that are not UTF-8 replaced by U+FFFD: the service would then answer with
entities and offsets into a string the client never sent. ``read_form`` parses forms with
Starlette's own parsers (``StrictMultiPartParser``, ``StrictFormParser``: their per-part callbacks
changed, which use the parsers' attributes; tests/test_json_bodies.py pins them), and also refuses a
multipart body that ends before its closing boundary (400) instead of reading it as a form with
fields missing, and a field sent more than once (422 naming it: Starlette would silently use the
last).

Uploads over 1 MB are spooled to the temporary directory while they are parsed: a disk that cannot
take them (full, read-only) is a logged ``507`` (``503`` for other storage errors), not the 400
"There was an error parsing the body" that FastAPI makes of any other error. And the bodies that a
process receives at once are bounded in total (``IMM_MAX_UPLOADS_BYTES``, from their declared
``Content-Length``, before one byte is read: ``UploadBudget``): beyond it, ``503`` with
``Retry-After``, so that many slow uploads cannot fill the disk.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import unquote_to_bytes

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser, parse_options_header
from starlette.requests import ClientDisconnect

from service.context import request_context
from service.errors import ClientDisconnected, FieldError

log = logging.getLogger("service.errors")

FieldsT = TypeVar("FieldsT", bound=BaseModel)

#: The errors of a disk that has no room left for an upload.
_NO_SPACE = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)


def _decode(field: str, data: bytes, charset: str) -> str:
    """``data`` decoded, or a 422 naming ``field`` (an HTTPException: FastAPI turns any other exception
    raised while it reads the body into a 400)."""
    try:
        return data.decode(charset)
    except UnicodeDecodeError as error:
        message = (
            f"{field} is not valid {charset}: byte {error.start} ({data[error.start : error.start + 1]!r}) "
            f"cannot be decoded; send the text in {charset}"
        )
        raise HTTPException(422, FieldError(field, message, "unicode_decode_error").detail) from None


def _too_large(field: str, limit: int) -> HTTPException:
    return HTTPException(413, f"the form field {field!r} is larger than the limit of {limit} bytes")


class StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser; text fields decode strictly, a text field over ``max_part_size``
    is a 413 (the parser's own error is a 400), and the body must be complete."""

    _complete = False

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + end - start > self.max_part_size:
            raise _too_large(part.field_name, self.max_part_size)
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            _decode(part.field_name, bytes(part.data), self._charset or "utf-8")
        super().on_part_end()

    def on_end(self) -> None:
        self._complete = True
        super().on_end()

    async def parse(self) -> FormData:
        form = await super().parse()
        if not self._complete:
            await form.close()
            raise MultiPartException("The multipart body ends before its closing boundary.")
        return form


class StrictFormParser(FormParser):
    """Starlette's URL-encoded form parser, with names and values decoded as strict UTF-8, and a
    field over ``max_part_size`` a 413."""

    def on_field_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_field_size + end - start > self.max_part_size:
            name = bytes(self._field_name).decode("utf-8", "replace")
            raise _too_large(name, self.max_part_size)
        super().on_field_data(data, start, end)

    def on_field_end(self) -> None:
        name = _decode("field name", unquote_to_bytes(bytes(self._field_name).replace(b"+", b" ")), "utf-8")
        value = _decode(name, unquote_to_bytes(bytes(self._field_value).replace(b"+", b" ")), "utf-8")
        super().on_field_end()  # counts the field (max_fields), appends its lossy reading: replaced
        self._items[-1] = (name, value)


#: The bodies the inference routes take, as their ``Content-Type`` names them.
FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")
JSON_TYPE = b"application/json"
ACCEPTED_TYPES = (
    "multipart/form-data (or application/x-www-form-urlencoded, without a picture) or application/json"
)
#: The API's fields are few: a form with more parts than these is not one of its requests (400).
MAX_FORM_FIELDS = 32
MAX_FORM_FILES = 4


@dataclass
class RequestBody(Generic[FieldsT]):
    """An inference request's fields, validated, and its picture's bytes (None without one)."""

    fields: FieldsT
    picture: bytes | None


def body_reader(
    form_model: type[FieldsT], json_model: type[FieldsT]
) -> Callable[[Request], Coroutine[Any, Any, RequestBody[FieldsT]]]:
    """A dependency reading a request's body, a form (``form_model``: the picture a file part
    ``image``) or JSON (``json_model``: the picture in base64 in ``image_base64``), into its fields.
    Another ``Content-Type`` is a 415 naming the two; a field that does not validate, a 422 naming it."""

    async def read_body(request: Request) -> RequestBody[FieldsT]:
        content_type, _ = parse_options_header(request.headers.get("content-type"))
        try:
            if content_type == JSON_TYPE:
                return await _read_json(request, json_model)
            if content_type in FORM_TYPES:
                return await _read_form(request, form_model)
        except ClientDisconnect:
            raise ClientDisconnected() from None  # gone before its body arrived: a 499, not a bug
        sent = request.headers.get("content-type")
        raise HTTPException(
            415,
            f"the body must be {ACCEPTED_TYPES}"
            + (f", not {sent}" if sent else ": the request has no Content-Type"),
        )

    return read_body


async def _read_json(request: Request, model: type[FieldsT]) -> RequestBody[FieldsT]:
    # The body is at most IMM_MAX_UPLOAD_BYTES (service.guard counts it as it arrives).
    body = await request.body()
    try:
        fields = model.model_validate_json(body)
    except ValidationError as error:
        raise _invalid_fields(error, json_body=True) from None
    request_context(request.scope).image_field = "image_base64"  # a picture error names it
    return RequestBody(fields, decode_base64("image_base64", getattr(fields, "image_base64", None)))


async def _read_form(request: Request, model: type[FieldsT]) -> RequestBody[FieldsT]:
    settings = request.app.state.engine.settings
    # A text field stops being read past the bytes max_text_chars characters can take in UTF-8
    # (413): parsing runs on the event loop, so it must not go on for megabytes.
    form = await read_form(request, max_part_size=4 * settings.max_text_chars)
    try:
        try:
            # An empty value is a field left out, as FastAPI reads forms ("image=" is no picture,
            # "pairs=" the default), except the text: empty text gets the engine's own message.
            sent = {name: value for name, value in form.items() if value != "" or name == "text"}
            fields = model.model_validate(sent)
        except ValidationError as error:
            raise _invalid_fields(error, json_body=False) from None
        image = getattr(fields, "image", None)
        if image is None or (not image.filename and not image.size):
            return RequestBody(fields, None)  # an empty file part: what a form sends when no file was chosen
        return RequestBody(fields, await image.read())
    finally:
        await form.close()


async def read_form(request: Request, *, max_part_size: int) -> FormData:
    """The request's form, parsed by the strict parsers (the module's docstring): a broken body is a
    400, a text field over ``max_part_size`` bytes a 413, text that is not UTF-8 or a field sent twice
    a 422 naming it."""
    content_type, _ = parse_options_header(request.headers.get("Content-Type"))
    parser: MultiPartParser | FormParser
    if content_type == b"multipart/form-data":
        parser = StrictMultiPartParser(
            request.headers,
            request.stream(),
            max_files=MAX_FORM_FILES,
            max_fields=MAX_FORM_FIELDS,
            max_part_size=max_part_size,
        )
    else:
        parser = StrictFormParser(
            request.headers, request.stream(), max_fields=MAX_FORM_FIELDS, max_part_size=max_part_size
        )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise HTTPException(status_code=400, detail=error.message) from None
    except (TimeoutError, ConnectionError):
        raise
    except OSError as error:  # spooling an upload to the temporary directory failed
        raise _storage_error(error) from None
    await _refuse_repeated_fields(form)
    return form


def _invalid_fields(error: ValidationError, *, json_body: bool) -> Exception:
    """The 422 of fields that do not validate, each named (``["body", field]``); a body that is not
    JSON at all is a 400."""
    errors = error.errors()
    broken = next((item for item in errors if item["type"] == "json_invalid"), None)
    if broken is not None:
        return HTTPException(400, f"the body is not valid JSON: {broken['msg']}")
    named = []
    for item in errors:
        item = {**item, "loc": ("body", *item["loc"])}
        if json_body and item["type"] == "extra_forbidden" and item["loc"][-1] == "image":
            item["msg"] = "a JSON body sends the picture in base64 in image_base64, not image"
        named.append(item)
    return RequestValidationError(named)


def decode_base64(field: str, value: str | None) -> bytes | None:
    """The bytes of ``value`` in base64 (line breaks and a ``data:...;base64,`` prefix allowed), None
    for none or an empty string, or a 422 naming ``field``."""
    if value is None:
        return None
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise FieldError(field, f"{field} is a data: URL without ;base64", "base64_decode_error")
    data = "".join(value.split())
    if not data:
        return None
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise FieldError(field, f"{field} is not valid base64: {error}", "base64_decode_error") from None


def _storage_error(error: OSError) -> HTTPException:
    """The answer to an upload the server could not store (logged: it is the server's problem). The
    connection stays open: the server reads the rest of the body (at most ``IMM_MAX_UPLOAD_BYTES``)
    and throws it away, so that the client gets the answer rather than a reset."""
    where = tempfile.gettempdir()
    if error.errno in _NO_SPACE:
        log.error(
            "an upload could not be stored: no space left in the temporary directory %s (%s)", where, error
        )
        return HTTPException(
            507,
            "the server has no room to store the upload right now: retry later",
            headers={"Retry-After": "5"},
        )
    log.error("an upload could not be stored in the temporary directory %s: %s", where, error)
    return HTTPException(
        503,
        "the server could not store the upload: retry later",
        headers={"Retry-After": "5"},
    )


async def _refuse_repeated_fields(form: FormData) -> None:
    """A 422 naming the first field sent more than once (every field of the API takes one value)."""
    counts = Counter(name for name, _ in form.multi_items())
    repeated = [(name, count) for name, count in counts.items() if count > 1]
    if repeated:
        await form.close()
        name, count = repeated[0]
        message = f"{name} given {count} times: send each field once"
        raise HTTPException(422, FieldError(name, message, "repeated_field").detail)


class UploadBudget:
    """The bytes of the request bodies that this process is receiving at once (declared by their
    ``Content-Length``; a body without one counts as ``IMM_MAX_UPLOAD_BYTES``). A body that would
    take the total past the limit is refused before it is read, unless no other is being received
    (a limit below ``IMM_MAX_UPLOAD_BYTES`` then still lets one through at a time)."""

    def __init__(self) -> None:
        self.reserved = 0

    def reserve(self, size: int, limit: int) -> bool:
        if self.reserved and self.reserved + size > limit:
            return False
        self.reserved += size
        return True

    def release(self, size: int) -> None:
        self.reserved -= size


#: This process's budget (one event loop receives every body of the process).
UPLOADS = UploadBudget()


def _declared_body(request: Request, settings: Any) -> int:
    """The bytes the request's body will take: its ``Content-Length``, or at most the body limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            return max(0, int(declared))
        except ValueError:
            return 0  # the guard answers 400 before this
    if "chunked" in request.headers.get("transfer-encoding", "").lower():
        return settings.max_upload_bytes
    return 0


class UploadBudgetRoute(APIRoute):
    """Routes whose requests' bodies count in this process's ``UPLOADS`` while they run."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def budgeted_handler(request: Request) -> Response:
            engine = getattr(request.app.state, "engine", None)
            settings = getattr(engine, "settings", None)
            size = _declared_body(request, settings) if settings is not None else 0
            if not size:
                return await handler(request)
            if not UPLOADS.reserve(size, settings.max_uploads_bytes):
                raise HTTPException(
                    503,
                    "too many uploads being received at once (IMM_MAX_UPLOADS_BYTES): retry later",
                    headers={"Retry-After": str(max(1, settings.retry_after_s)), "Connection": "close"},
                )
            try:
                return await handler(request)
            finally:
                UPLOADS.release(size)

        return budgeted_handler
