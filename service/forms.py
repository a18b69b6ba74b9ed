"""Form parsing that never guesses: text that is not valid in its charset is a 422 naming the field.

Starlette reads a text field that does not decode in the request's charset (UTF-8 unless the
``Content-Type`` says otherwise) as Latin-1, and a URL-encoded form as Latin-1 always, with
``%XX`` escapes that are not UTF-8 replaced by U+FFFD: the service would then answer with
entities and offsets into a string the client never sent. ``StrictFormRoute`` (the app's route
class, FastAPI's documented way to customise the request) parses forms with Starlette's own
parsers, changed only there, and also refuses a multipart body that ends before its closing
boundary (400) instead of reading it as a form with fields missing.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser, parse_options_header

from service.errors import FieldError


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


class StrictFormRequest(Request):
    """A request whose ``form()`` uses the strict parsers (same limits, same errors otherwise)."""

    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        if self._form is None:
            content_type, _ = parse_options_header(self.headers.get("Content-Type"))
            parser: MultiPartParser | FormParser | None = None
            if content_type == b"multipart/form-data":
                parser = StrictMultiPartParser(
                    self.headers,
                    self.stream(),
                    max_files=max_files,
                    max_fields=max_fields,
                    max_part_size=max_part_size,
                )
            elif content_type == b"application/x-www-form-urlencoded":
                parser = StrictFormParser(
                    self.headers, self.stream(), max_fields=max_fields, max_part_size=max_part_size
                )
            if parser is None:
                self._form = FormData()
            else:
                try:
                    self._form = await parser.parse()
                except MultiPartException as error:
                    raise HTTPException(status_code=400, detail=error.message) from None
        return self._form


class StrictFormRoute(APIRoute):
    """Routes whose handlers see a ``StrictFormRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_form_handler(request: Request) -> Response:
            return await handler(StrictFormRequest(request.scope, request.receive))

        return strict_form_handler
