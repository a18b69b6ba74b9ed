"""The HTTP routes: module-level routers that read a request's fields, call the app's ``Engine`` and
return its answer. No policy lives here: admission, deadlines, batching and the models are the
engine's (``engine``), error statuses are ``service.errors``'.

Each inference call runs until the engine answers or the client disconnects: a client that goes
away while its request waits (in the preprocessing pool or a model's queue) cancels it, so its rows
never reach the model (``until_disconnected``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.types import Receive

from engine import Admission, Engine, Trace
from engine.answers import ExtractResponse, NERResponse, REResponse
from model.tasks import TASKS
from service.context import request_context
from service.errors import ClientDisconnected
from service.forms import RequestBody, UploadBudgetRoute, body_reader
from service.guard import authorised
from service.schemas import (
    ErrorResponse,
    ExtractFields,
    ExtractForm,
    ExtractJson,
    HealthResponse,
    NERFields,
    NERForm,
    NERJson,
    ReadyResponse,
    REFields,
    REForm,
    REJson,
)

T = TypeVar("T")

#: The models each inference path uses (the early admission check asks the engine about them).
MODELS_OF_PATH: dict[str, tuple[str, ...]] = {
    **{spec.route: (spec.name,) for spec in TASKS.values()},
    "/extract": ("ner", "re"),
}

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Malformed body: a multipart body without its boundary or cut before its end, "
        "too many fields or files, a JSON body that is not valid JSON, an invalid Content-Length; or an "
        "X-Request-Timeout that is not a positive number of seconds",
    },
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when one is configured)"},
    404: {
        "model": ErrorResponse,
        "description": "The model the path needs is switched off on this server (its bundle setting, "
        "IMM_NER_BUNDLE or IMM_RE_BUNDLE, is empty; named in the message): retrying will not help",
    },
    408: {"model": ErrorResponse, "description": "The request body did not arrive within IMM_BODY_TIMEOUT_S"},
    413: {
        "model": ErrorResponse,
        "description": "Request body, text or image pixel count over the limit; for /extract, more entity "
        "pairs than IMM_MAX_RELATION_PAIRS",
    },
    415: {
        "model": ErrorResponse,
        "description": "The picture is not an image; or the body is neither multipart/form-data (nor "
        "application/x-www-form-urlencoded) nor application/json",
    },
    422: {
        "model": ErrorResponse,
        "description": "Invalid field (named in loc): missing, of the wrong type, not valid UTF-8, unknown "
        "(JSON), text empty or only whitespace, image_base64 not valid base64, corrupt image, an image sent "
        "as a text field, bad offsets (the same words twice, or spans that cross), an unknown pairs option",
    },
    503: {
        "model": ErrorResponse,
        "description": "Model still loading, failed to load, or overloaded: its queue is full or would not "
        "answer before the request's deadline (refused before the body is read; see Retry-After)",
    },
    504: {
        "model": ErrorResponse,
        "description": "The request's deadline (X-Request-Timeout, at most IMM_REQUEST_TIMEOUT_S) passed "
        "before its answer: it left the queue without being computed",
    },
}

#: The deadline header, documented on every inference route (read by ``service.guard``).
TIMEOUT_PARAMETER = {
    "name": "X-Request-Timeout",
    "in": "header",
    "required": False,
    "description": "How many seconds the client will wait for the answer (default and cap: "
    "IMM_REQUEST_TIMEOUT_S). A request that could not be answered in time is refused at once (503); "
    "one whose deadline passes while it waits leaves the queue uncomputed (504).",
    "schema": {"type": "number", "exclusiveMinimum": 0, "examples": [1.5]},
}

#: The demo page and its files; served without the API key, which the page asks for when needed.
STATIC_DIR = Path(__file__).resolve().parent / "static"
_PAGE_HEADERS = {
    # Everything comes from this server: no CDN, no inline script (blob: is the picture's preview).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


async def engine_of(request: Request) -> Engine:
    # async: FastAPI would run a plain function in a worker thread, a hand-off per request
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(engine_of)]

inference = APIRouter(tags=["inference"], route_class=UploadBudgetRoute, responses=ERRORS)
operations = APIRouter(tags=["operations"])


@dataclass
class Call:
    """What the HTTP layer hands an engine call besides the request's fields."""

    trace: Trace
    deadline: float | None
    admission: Admission | None

    def options(self) -> dict[str, Any]:
        return {"trace": self.trace, "deadline": self.deadline, "admission": self.admission}


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read: only that message can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ``ClientDisconnected`` (``work`` cancelled) if the client goes first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    finished = False
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finished = task.done()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # the client went, or the server cancels this request (shutdown)
    if not finished:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task  # its rows leave the queues (counted by the engine)
        raise ClientDisconnected()
    return task.result()


async def answer(request: Request, response: Response, call: Callable[[Call], Awaitable[T]]) -> T:
    """Runs ``call(Call(...))`` for the request: its deadline and the admission the guard took before
    the body (``service.guard``); its stages become the Server-Timing header and its details the
    access log's fields."""
    taken = request_context(request.scope)
    trace = Trace()
    context = Call(trace=trace, deadline=taken.deadline, admission=taken.admission)
    result = await until_disconnected(request, call(context))
    # The stages in ms, and "total" from the parsed request to the answer (the demo page shows it).
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in trace.stages.items())
    request_context(request.scope).log_extra = trace.details
    return result


def _inference_route(form_model: type[BaseModel], json_model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI of a route whose body ``service.forms.body_reader`` reads: its two content types,
    and the deadline header."""
    return {
        "openapi_extra": {
            "parameters": [TIMEOUT_PARAMETER],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": form_model.model_json_schema()},
                    "application/json": {"schema": json_model.model_json_schema()},
                },
            },
        }
    }


NERBody = Annotated[RequestBody[NERFields], Depends(body_reader(NERForm, NERJson))]
REBody = Annotated[RequestBody[REFields], Depends(body_reader(REForm, REJson))]
ExtractBody = Annotated[RequestBody[ExtractFields], Depends(body_reader(ExtractForm, ExtractJson))]


@inference.post("/ner", response_model=NERResponse, **_inference_route(NERForm, NERJson))
async def ner(request: Request, response: Response, engine: EngineDep, body: NERBody) -> NERResponse:
    """Named entities of a tweet, with character offsets and confidences."""
    fields = body.fields
    return await answer(
        request, response, lambda call: engine.ner(fields.text, body.picture, **call.options())
    )


@inference.post("/re", response_model=REResponse, **_inference_route(REForm, REJson))
async def relation(request: Request, response: Response, engine: EngineDep, body: REBody) -> REResponse:
    """The relation between two entities of a tweet, given by character offsets."""
    fields = body.fields
    head, tail = (fields.head_start, fields.head_end), (fields.tail_start, fields.tail_end)
    return await answer(
        request, response, lambda call: engine.re(fields.text, head, tail, body.picture, **call.options())
    )


@inference.post("/extract", response_model=ExtractResponse, **_inference_route(ExtractForm, ExtractJson))
async def extract(
    request: Request, response: Response, engine: EngineDep, body: ExtractBody
) -> ExtractResponse:
    """The entities of a tweet (as /ner) and the relations between them (as /re), in one call.

    The picture is decoded once and read by both models; the entity pairs go to the RE model as
    one batch. With the RE model switched off (IMM_RE_BUNDLE empty), the entities alone, with
    `relations: []` and a note saying so.
    """
    fields = body.fields
    return await answer(
        request,
        response,
        lambda call: engine.extract(
            fields.text, body.picture, pairs=fields.pairs, include_none=fields.include_none, **call.options()
        ),
    )


@operations.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    """Alive: the process answers (models may still be loading)."""
    return HealthResponse()


@operations.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def ready(engine: EngineDep, request: Request) -> JSONResponse:
    """Ready: loading is over and at least one model is loaded and warmed up (with IMM_READY_STRICT:
    every configured model); 503 otherwise. Why a model is not ready (its ``detail``, which may name
    the server's files) is told only to a caller with the API key; others read which model it is."""
    body = ReadyResponse(ready=engine.is_ready, models=engine.status())
    key = engine.settings.api_key
    if not authorised(request.scope, key.get_secret_value().encode() if key else None):
        for task, model in body.models.items():
            if model.detail is not None:
                model.detail = f"the {task.upper()} model is {model.status} (the server's log says why)"
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@operations.get("/metrics", response_class=Response)
async def metrics(engine: EngineDep) -> Response:
    """Prometheus metrics: requests by endpoint and status, stage latencies, batch sizes, queues."""
    engine.refresh_gauges()
    return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@operations.get("/", include_in_schema=False)
async def demo_page() -> FileResponse:
    """The demo page (docs/demo.md)."""
    return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)
