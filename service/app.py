"""The FastAPI app: ``POST /ner``, ``POST /re``, ``/health``, ``/ready``, ``/metrics``, ``/docs``, and
the demo page at ``/`` (``service/static/``, see docs/demo.md).

A request goes: guard (API key, body size, on the raw stream) -> multipart parsing -> admission
into the model's bounded queue -> preprocessing in a thread pool -> the dynamic batcher (one
ONNX Runtime call per batch, in the model's inference thread) -> the JSON answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from service.batcher import BatcherClosed, QueueFull
from service.docs import install_docs
from service.errors import ApiError, install_error_handlers
from service.forms import StrictFormRoute
from service.guard import GuardMiddleware
from service.observability import RequestContextMiddleware
from service.pipeline import Entity, Prepared, Relation
from service.registry import ModelSlot, ServiceState
from service.schemas import (
    EntityOut,
    ErrorResponse,
    HealthResponse,
    ModelStatus,
    NERResponse,
    ReadyResponse,
    REResponse,
)
from service.settings import Settings

DESCRIPTION = """
Multimodal named entity recognition and relation extraction on tweets (IMM), served on ONNX Runtime.

* Offsets are **Unicode code points** into the exact text sent: `text[start:end] == entity.text`
  (in JavaScript, count with `Array.from(text)`, not UTF-16 units).
* The image is optional; without one the model reads the text alone.
* Text longer than the model's window is answered on its first window, with `truncated: true`.
"""

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Malformed body: a multipart body without its boundary or cut before its end, "
        "too many fields or files, an invalid Content-Length",
    },
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when one is configured)"},
    408: {"model": ErrorResponse, "description": "The request body did not arrive within IMM_BODY_TIMEOUT_S"},
    413: {"model": ErrorResponse, "description": "Request body, text or image pixel count over the limit"},
    415: {"model": ErrorResponse, "description": "The file is not an image"},
    422: {
        "model": ErrorResponse,
        "description": "Invalid field (named in loc): missing, empty or not valid UTF-8 text, corrupt "
        "image, an image sent as a text field, bad offsets",
    },
    503: {
        "model": ErrorResponse,
        "description": "Model not available, still loading, or its queue is full (see Retry-After)",
    },
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


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app for ``settings`` (default: from the environment). Models load when it starts."""
    settings = settings or Settings()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        if settings.workers > 1:
            # One of several processes on a shared port: take no connection before the models are
            # warm, or the kernel would hand this process requests that the ready ones could answer.
            await asyncio.to_thread(state.loaded.wait)
        try:
            yield
        finally:
            await state.stop()
            state.metrics.process_exiting()

    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    # Documents the bearer scheme in /docs; the key is enforced by GuardMiddleware before parsing.
    auth = [Depends(HTTPBearer(auto_error=False))] if api_key else []

    app = FastAPI(
        title="IMM inference service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # A text field stops being read past the bytes max_text_chars characters can take in UTF-8
        # (413, service/forms.py): parsing runs on the event loop, so it must not go on for megabytes.
        form_limits={"max_part_size": 4 * settings.max_text_chars},
        docs_url=None,  # install_docs: Swagger UI from this server, not from a CDN
        redoc_url=None,
    )
    app.router.route_class = StrictFormRoute  # text that is not valid UTF-8: 422, never read as Latin-1
    app.state.imm = state
    install_error_handlers(app)
    app.add_middleware(
        GuardMiddleware,
        paths=("/ner", "/re"),
        max_body_bytes=settings.max_upload_bytes,
        api_key=api_key,
        body_timeout_s=settings.body_timeout_s,
        retry_after_s=settings.retry_after_s,
    )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=state.metrics,
        endpoints=("/ner", "/re", "/health", "/ready", "/metrics"),
    )

    def available(task: str) -> ModelSlot:
        slot = state.slots[task]
        if slot.ready:
            return slot
        if slot.status == "loading":
            raise ApiError(503, f"the {task.upper()} model is still loading", {"Retry-After": "5"})
        raise ApiError(503, f"the {task.upper()} model is not available: {slot.detail}")

    def check_text(text: str) -> None:
        if len(text) > settings.max_text_chars:
            raise ApiError(
                413, f"text is {len(text)} characters long, more than the limit of {settings.max_text_chars}"
            )

    async def image_bytes(image: UploadFile | None) -> bytes | None:
        if image is None or (not image.filename and not image.size):
            return None  # an empty file part: what a form sends when no file was chosen
        return await image.read()

    async def run(
        request: Request, response: Response, slot: ModelSlot, prepare: Any, *args: Any
    ) -> tuple[Prepared, Any]:
        """Admission, preprocessing in the pool, then the batcher; maps overload to 503."""
        assert slot.batcher is not None and slot.pipeline is not None
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        retry = {"Retry-After": str(settings.retry_after_s)}
        try:
            with slot.batcher.incoming():
                prepared: Prepared = await loop.run_in_executor(state.preprocess_pool, prepare, *args)
            state.metrics.queue_depth.labels(slot.task).set(slot.batcher.depth + 1)
            result, timings = await slot.batcher.submit(prepared, settings.request_timeout_s)
            state.metrics.queue_depth.labels(slot.task).set(slot.batcher.depth)
        except QueueFull:
            state.metrics.rejected.labels(slot.task).inc()
            raise ApiError(
                503, f"the {slot.task.upper()} model is busy: its queue is full, retry later", retry
            ) from None
        except asyncio.TimeoutError:
            raise ApiError(
                503, f"no answer within {settings.request_timeout_s} s: the service is overloaded", retry
            ) from None
        except BatcherClosed:
            raise ApiError(503, "the service is shutting down", retry) from None
        endpoint = f"/{slot.task}"
        stages = {**prepared.stages, "queue_wait": timings.queue_wait_s, "inference": timings.inference_s}
        state.metrics.observe_stages(endpoint, stages)
        # The stages in ms, and "total" from the parsed request to the answer (the demo page shows it).
        stages["total"] = time.perf_counter() - started
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in stages.items())
        request.scope["state"]["log_extra"] = {
            "model": slot.pipeline.name,
            "batch": timings.batch_size,
            "image": prepared.image_used,
            "words": len(prepared.words),
        }
        return prepared, result

    @app.post("/ner", response_model=NERResponse, responses=_ERRORS, dependencies=auth, tags=["inference"])
    async def ner(
        request: Request, response: Response, text: TextField, image: ImageField = None
    ) -> NERResponse:
        """Named entities of a tweet, with character offsets and confidences."""
        slot = available("ner")
        check_text(text)
        data = await image_bytes(image)
        assert slot.pipeline is not None
        prepared, entities = await run(request, response, slot, slot.pipeline.prepare, text, data)
        return NERResponse(
            entities=[EntityOut(**vars(e)) for e in entities if isinstance(e, Entity)],
            image_used=prepared.image_used,
            truncated=prepared.truncated,
            model=slot.pipeline.name,
            notes=prepared.notes,
        )

    @app.post("/re", response_model=REResponse, responses=_ERRORS, dependencies=auth, tags=["inference"])
    async def relation(
        request: Request,
        response: Response,
        text: Annotated[
            str,
            Form(
                description="The tweet, as posted",
                examples=["Alice Smith moved to Paris last year #newhome"],
            ),
        ],
        head_start: Annotated[int, _offset("head", "start", 0)],
        head_end: Annotated[int, _offset("head", "end", 11)],
        tail_start: Annotated[int, _offset("tail", "start", 21)],
        tail_end: Annotated[int, _offset("tail", "end", 26)],
        image: ImageField = None,
    ) -> REResponse:
        """The relation between two entities of a tweet, given by character offsets."""
        slot = available("re")
        check_text(text)
        data = await image_bytes(image)
        assert slot.pipeline is not None
        prepared, result = await run(
            request,
            response,
            slot,
            slot.pipeline.prepare,
            text,
            data,
            (head_start, head_end),
            (tail_start, tail_end),
        )
        assert isinstance(result, Relation)
        return REResponse(
            relation=result.relation,
            score=result.score,
            scores=result.scores,
            image_used=prepared.image_used,
            truncated=prepared.truncated,
            model=slot.pipeline.name,
            notes=prepared.notes,
        )

    @app.get("/health", response_model=HealthResponse, tags=["operations"])
    async def health() -> HealthResponse:
        """Alive: the process answers (models may still be loading)."""
        return HealthResponse()

    @app.get(
        "/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}}, tags=["operations"]
    )
    async def ready() -> JSONResponse:
        """Ready: loading is over and at least one model is loaded and warmed up (503 otherwise)."""
        body = ReadyResponse(
            ready=state.is_ready,
            models={
                task: ModelStatus(
                    status=slot.status,
                    detail=slot.detail,
                    name=slot.pipeline.name if slot.pipeline else None,
                    provider=slot.provider,
                )
                for task, slot in state.slots.items()
            },
        )
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics: requests by endpoint and status, stage latencies, batch sizes."""
        for task, slot in state.slots.items():
            if slot.batcher is not None:
                state.metrics.queue_depth.labels(task).set(slot.batcher.depth)
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        """The demo page (docs/demo.md)."""
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)

    install_docs(app, favicon_url="/static/favicon.svg")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
