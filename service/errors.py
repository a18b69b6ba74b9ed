"""Error answers: one JSON shape, the right status for each bad input, never a traceback.

Bodies follow FastAPI's convention: ``{"detail": "message"}``, or for 422 a list of
``{"loc": ["body", field], "msg", "type"}`` naming the field; every body also carries the
request id. The engine's errors (``engine.errors``) map to their statuses here, the one
place that knows both: invalid field 422, too large 413, model unavailable (404 when switched
off: ``service.routes``), overloaded or shutting down 503 (with Retry-After), deadline exceeded 504.
Image errors from the shared preprocessing map to 415 (not an image), 422 (corrupt or truncated)
and 413 (too many pixels). A request whose client disconnected before its answer is logged and
counted as 499 (nginx's "client closed request"; no one reads that answer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from engine.errors import (
    DeadlineExceeded,
    InputTooLarge,
    InvalidInput,
    ModelSwitchedOff,
    ModelUnavailable,
    Overloaded,
    ShuttingDown,
)
from model.preprocessing import CorruptImage, ImageError, ImageTooLarge, NotAnImage
from service.context import request_context

#: The status of a request whose client went away first (nginx's convention).
CLIENT_CLOSED_REQUEST = 499


class ApiError(Exception):
    """An answer other than 200, raised anywhere in request handling."""

    def __init__(self, status: int, detail: Any, headers: Mapping[str, str] | None = None):
        super().__init__(detail if isinstance(detail, str) else json.dumps(detail))
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


class FieldError(ApiError):
    """A 422 about one form field, in FastAPI's validation-error shape."""

    def __init__(self, field: str, message: str, kind: str = "value_error"):
        super().__init__(422, [{"loc": ["body", field], "msg": message, "type": kind}])
        self.field = field


class ClientDisconnected(Exception):
    """The client disconnected before its answer: the engine's call was cancelled."""


def retry_after(seconds: float) -> dict[str, str]:
    """A Retry-After header (whole seconds, at least 1)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def image_error_status(error: ImageError) -> int:
    if isinstance(error, NotAnImage):
        return 415
    if isinstance(error, ImageTooLarge):
        return 413
    if isinstance(error, CorruptImage):
        return 422
    return 422


def json_error_body(detail: Any, request_id: str | None) -> bytes:
    return json.dumps({"detail": detail, "request_id": request_id}, ensure_ascii=False).encode()


async def send_json_error(
    send: Send,
    status: int,
    detail: Any,
    request_id: str | None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """The API's JSON error, sent on the raw ASGI stream (for the layers under FastAPI's handlers)."""
    body = json_error_body(detail, request_id)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _request_id(request: Request) -> str | None:
    return request_context(request.scope).request_id


def _image_field(request: Request) -> str:
    return request_context(request.scope).image_field


def error_response(
    request: Request, status: int, detail: Any, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"detail": detail, "request_id": _request_id(request)},
        status_code=status,
        headers=dict(headers or {}),
    )


def _clean_validation_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's errors without ``input``/``ctx``: they would echo the client's (maybe huge) input back.

    A text field where a file was expected gets a message for the client, not FastAPI's internal
    "Expected UploadFile, received: <class 'str'>".
    """
    cleaned = []
    for error in errors:
        loc, msg, kind = list(error.get("loc", ())), error.get("msg", ""), error.get("type", "")
        if "Expected UploadFile" in msg and isinstance(error.get("input"), str):
            field = loc[-1] if loc else "file"
            msg = f"{field} must be a file (a multipart part with a filename), not a text field"
            kind = "file_expected"
        cleaned.append({"loc": loc, "msg": msg, "type": kind})
    return cleaned


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request, error.status, error.detail, error.headers)

    @app.exception_handler(ImageError)
    async def _image_error(request: Request, error: ImageError) -> JSONResponse:
        return error_response(
            request,
            image_error_status(error),
            # the field the picture came in: "image" (a form's file part) or "image_base64" (JSON)
            [{"loc": ["body", _image_field(request)], "msg": str(error), "type": type(error).__name__}],
        )

    @app.exception_handler(InvalidInput)
    async def _invalid_input(request: Request, error: InvalidInput) -> JSONResponse:
        return error_response(request, 422, FieldError(error.field, error.message, error.kind).detail)

    @app.exception_handler(InputTooLarge)
    async def _too_large(request: Request, error: InputTooLarge) -> JSONResponse:
        return error_response(request, 413, str(error))

    @app.exception_handler(ModelUnavailable)
    async def _unavailable(request: Request, error: ModelUnavailable) -> JSONResponse:
        if isinstance(error, ModelSwitchedOff):  # by this server's settings: a retry cannot help
            return error_response(request, 404, str(error))
        return error_response(request, 503, str(error), {"Retry-After": "5"} if error.loading else None)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, error: Overloaded) -> JSONResponse:
        return error_response(request, 503, f"{error}: retry later", retry_after(error.retry_after_s))

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(request: Request, error: DeadlineExceeded) -> JSONResponse:
        return error_response(request, 504, str(error))

    @app.exception_handler(ShuttingDown)
    async def _shutting_down(request: Request, error: ShuttingDown) -> JSONResponse:
        return error_response(request, 503, str(error), retry_after(1))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, error: ClientDisconnected) -> JSONResponse:
        return error_response(request, CLIENT_CLOSED_REQUEST, "the client disconnected before the answer")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, _clean_validation_errors(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(request, error.status_code, error.detail, getattr(error, "headers", None))

    # A bug in a route: Starlette's outermost layer answers with this (its own answer would be
    # plain text) and re-raises, and the request context logs it (service.observability).
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return error_response(request, 500, "internal server error")
