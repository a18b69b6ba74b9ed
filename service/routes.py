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
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive

from engine import Admission, Engine, Trace
from engine.answers import ExtractResponse, NERResponse, REResponse
from service.errors import ClientDisconnected
from service.forms import StrictFormRoute
from service.guard import authorised
from service.schemas import ErrorResponse, HealthResponse, ReadyResponse

T = TypeVar("T")

#: The models each inference path needs (the early admission check asks the engine about them).
MODELS_OF_PATH: dict[str, tuple[str, ...]] = {"/ner": ("ner",), "/re": ("re",), "/extract": ("ner", "re")}

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Malformed body: a multipart body without its boundary or cut before its end, "
        "too many fields or files, an invalid Content-Length; or an X-Request-Timeout that is not a "
        "positive number of seconds",
    },
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when one is configured)"},
    408: {"model": ErrorResponse, "description": "The request body did not arrive within IMM_BODY_TIMEOUT_S"},
    413: {
        "model": ErrorResponse,
        "description": "Request body, text or image pixel count over the limit; for /extract, more entity "
        "pairs than IMM_MAX_RELATION_PAIRS",
    },
    415: {"model": ErrorResponse, "description": "The file is not an image"},
    422: {
        "model": ErrorResponse,
        "description": "Invalid field (named in loc): missing, empty or not valid UTF-8 text, corrupt "
        "image, an image sent as a text field, bad offsets (the same words twice, or spans that cross), "
        "an unknown pairs option",
    },
    503: {
        "model": ErrorResponse,
        "description": "Model not available (for /extract: either of them), still loading, or overloaded: "
        "its queue is full or would not answer before the request's deadline (refused before the body is "
        "read; see Retry-After)",
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

TextField = Annotated[
    str,
    Form(
        description="The tweet, as posted (any script, emoji included)",
        examples=["Alice Smith is in Paris with the Lakers 🏀 #NBA @alice"],
    ),
]
ImageField = Annotated[
    UploadFile | None,
    File(description="Optional picture posted with the tweet (JPEG, PNG, GIF, WebP, ...)"),
]


def _offset(role: str, end: str, example: int) -> Any:
    return Form(
        description=f"Character offset (code points) of the {end} of the {role} entity", examples=[example]
    )


async def engine_of(request: Request) -> Engine:
    # async: FastAPI would run a plain function in a worker thread, a hand-off per request
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(engine_of)]

inference = APIRouter(
    tags=["inference"], route_class=StrictFormRoute, responses=ERRORS
)  # text that is not valid UTF-8: 422, never read as Latin-1 (service.forms)
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
    state = request.scope["state"]
    trace = Trace()
    context = Call(trace=trace, deadline=state.get("deadline"), admission=state.get("admission"))
    result = await until_disconnected(request, call(context))
    # The stages in ms, and "total" from the parsed request to the answer (the demo page shows it).
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in trace.stages.items())
    request.scope["state"]["log_extra"] = trace.details
    return result


async def read_upload(image: UploadFile | None) -> bytes | None:
    if image is None or (not image.filename and not image.size):
        return None  # an empty file part: what a form sends when no file was chosen
    return await image.read()


_INFERENCE_ROUTE: dict[str, Any] = {"openapi_extra": {"parameters": [TIMEOUT_PARAMETER]}}


@inference.post("/ner", response_model=NERResponse, **_INFERENCE_ROUTE)
async def ner(
    request: Request, response: Response, engine: EngineDep, text: TextField, image: ImageField = None
) -> NERResponse:
    """Named entities of a tweet, with character offsets and confidences."""
    picture = await read_upload(image)
    return await answer(
        request,
        response,
        lambda call: engine.ner(text, picture, **call.options()),
    )


@inference.post("/re", response_model=REResponse, **_INFERENCE_ROUTE)
async def relation(
    request: Request,
    response: Response,
    engine: EngineDep,
    text: Annotated[
        str,
        Form(description="The tweet, as posted", examples=["Alice Smith moved to Paris last year #newhome"]),
    ],
    head_start: Annotated[int, _offset("head", "start", 0)],
    head_end: Annotated[int, _offset("head", "end", 11)],
    tail_start: Annotated[int, _offset("tail", "start", 21)],
    tail_end: Annotated[int, _offset("tail", "end", 26)],
    image: ImageField = None,
) -> REResponse:
    """The relation between two entities of a tweet, given by character offsets."""
    picture = await read_upload(image)
    return await answer(
        request,
        response,
        lambda call: engine.re(
            text, (head_start, head_end), (tail_start, tail_end), picture, **call.options()
        ),
    )


@inference.post("/extract", response_model=ExtractResponse, **_INFERENCE_ROUTE)
async def extract(
    request: Request,
    response: Response,
    engine: EngineDep,
    text: TextField,
    image: ImageField = None,
    pairs: Annotated[
        Literal["typed", "all"],
        Form(
            description="Which entity pairs to classify: 'typed' (the default: only the pairs whose "
            "head and tail types some relation of the RE model joins, as its labels name them: "
            "/per/loc/place_of_residence joins a PER head to a LOC tail) or 'all' (every ordered "
            "pair of distinct entities: n entities make n(n-1) pairs; for an RE model whose labels "
            "name no types)",
        ),
    ] = "typed",
    include_none: Annotated[
        bool, Form(description="Also list the pairs whose most probable relation is 'None'")
    ] = False,
) -> ExtractResponse:
    """The entities of a tweet (as /ner) and the relations between them (as /re), in one call.

    The picture is decoded once and read by both models; the entity pairs go to the RE model as
    one batch. Both models must be loaded.
    """
    picture = await read_upload(image)
    return await answer(
        request,
        response,
        lambda call: engine.extract(text, picture, pairs=pairs, include_none=include_none, **call.options()),
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
