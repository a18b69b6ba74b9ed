"""The FastAPI app: ``POST /ner``, ``POST /re``, ``POST /extract``, ``/health``, ``/ready``,
``/metrics``, ``/docs``, and the demo page at ``/`` (``service/static/``, see docs/demo.md).

A request goes: guard (API key, body size, on the raw stream) -> multipart parsing -> admission
into the model's bounded queue -> preprocessing in a thread pool -> the dynamic batcher (one
ONNX Runtime call per batch, in the model's inference thread) -> the JSON answer. ``/extract``
goes that way twice: through the NER model, then with all its entity pairs as one group through
the RE model, the picture decoded once for both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from model.data.mnre import NO_RELATION
from service.batcher import BatcherClosed, BatchTimings, QueueFull
from service.docs import install_docs
from service.errors import ApiError, FieldError, install_error_handlers
from service.forms import StrictFormRoute
from service.guard import GuardMiddleware
from service.observability import INFERENCE_ENDPOINTS, RequestContextMiddleware
from service.pipeline import Entity, NERPipeline, Photo, Prepared, Relation, REPipeline
from service.registry import ModelSlot, ServiceState
from service.schemas import (
    EntityOut,
    ErrorResponse,
    ExtractModels,
    ExtractResponse,
    HealthResponse,
    ModelStatus,
    NERResponse,
    ReadyResponse,
    RelationOut,
    REResponse,
)
from service.settings import Settings

DESCRIPTION = """
Multimodal named entity recognition and relation extraction on tweets (IMM), served on ONNX Runtime.

* Offsets are **Unicode code points** into the exact text sent: `text[start:end] == entity.text`
  (in JavaScript, count with `Array.from(text)`, not UTF-16 units).
* The image is optional; without one the model reads the text alone.
* Text longer than the model's window is answered on its first window, with `truncated: true`.
* `POST /extract` answers both at once: the entities, and the relations between them.
"""

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Malformed body: a multipart body without its boundary or cut before its end, "
        "too many fields or files, an invalid Content-Length",
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
        "description": "Model not available (for /extract: either of them), still loading, or its queue "
        "is full (see Retry-After)",
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
        paths=INFERENCE_ENDPOINTS,
        max_body_bytes=settings.max_upload_bytes,
        api_key=api_key,
        body_timeout_s=settings.body_timeout_s,
        retry_after_s=settings.retry_after_s,
    )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=state.metrics,
        endpoints=(*INFERENCE_ENDPOINTS, "/health", "/ready", "/metrics"),
    )

    def available(*tasks: str) -> list[ModelSlot]:
        """The slots of ``tasks``, or a 503 naming each model that is not ready (Retry-After while loading)."""
        problems, loading = [], False
        for task in tasks:
            slot = state.slots[task]
            if slot.status == "loading":
                loading = True
                problems.append(f"the {task.upper()} model is still loading")
            elif not slot.ready:
                problems.append(f"the {task.upper()} model is not available: {slot.detail}")
        if problems:
            raise ApiError(503, "; ".join(problems), {"Retry-After": "5"} if loading else None)
        return [state.slots[task] for task in tasks]

    def check_text(text: str) -> None:
        if len(text) > settings.max_text_chars:
            raise ApiError(
                413, f"text is {len(text)} characters long, more than the limit of {settings.max_text_chars}"
            )

    async def read_photo(image: UploadFile | None) -> Photo | None:
        if image is None or (not image.filename and not image.size):
            return None  # an empty file part: what a form sends when no file was chosen
        return Photo(await image.read())

    async def infer(
        slot: ModelSlot, timeout_s: float, prepare: Any, *args: Any
    ) -> tuple[Any, Any, BatchTimings]:
        """Admission, preprocessing in the pool, then the batcher; maps overload to 503.

        ``prepare`` makes one ``Prepared`` (one item) or a list of them (a group: one request to the
        batcher, run in one batch, answered together); the results come back in the same shape.
        """
        assert slot.batcher is not None
        loop = asyncio.get_running_loop()
        retry = {"Retry-After": str(settings.retry_after_s)}
        try:
            with slot.batcher.incoming():
                prepared = await loop.run_in_executor(state.preprocess_pool, prepare, *args)
            state.metrics.queue_depth.labels(slot.task).set(slot.batcher.depth + 1)
            if isinstance(prepared, list):
                result, timings = await slot.batcher.submit_group(prepared, timeout_s)
            else:
                result, timings = await slot.batcher.submit(prepared, timeout_s)
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
        return prepared, result, timings

    def answered(
        request: Request,
        response: Response,
        endpoint: str,
        started: float,
        stages: dict[str, float],
        log_extra: dict[str, Any],
    ) -> None:
        """The stage metrics, the Server-Timing header and the access log's fields of an answer."""
        state.metrics.observe_stages(endpoint, stages)
        # The stages in ms, and "total" from the parsed request to the answer (the demo page shows it).
        stages = {**stages, "total": time.perf_counter() - started}
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in stages.items())
        request.scope["state"]["log_extra"] = log_extra

    async def run(
        request: Request, response: Response, slot: ModelSlot, prepare: Any, *args: Any
    ) -> tuple[Prepared, Any]:
        """One request of one model (``infer``), answered with its stages."""
        assert slot.pipeline is not None
        started = time.perf_counter()
        prepared, result, timings = await infer(slot, settings.request_timeout_s, prepare, *args)
        stages = {**prepared.stages, "queue_wait": timings.queue_wait_s, "inference": timings.inference_s}
        answered(
            request,
            response,
            f"/{slot.task}",
            started,
            stages,
            {
                "model": slot.pipeline.name,
                "batch": timings.batch_size,
                "image": prepared.image_used,
                "words": len(prepared.words),
            },
        )
        return prepared, result

    @app.post("/ner", response_model=NERResponse, responses=_ERRORS, dependencies=auth, tags=["inference"])
    async def ner(
        request: Request, response: Response, text: TextField, image: ImageField = None
    ) -> NERResponse:
        """Named entities of a tweet, with character offsets and confidences."""
        (slot,) = available("ner")
        check_text(text)
        photo = await read_photo(image)
        assert slot.pipeline is not None
        prepared, entities = await run(request, response, slot, slot.pipeline.prepare, text, photo)
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
        (slot,) = available("re")
        check_text(text)
        photo = await read_photo(image)
        assert slot.pipeline is not None
        prepared, result = await run(
            request,
            response,
            slot,
            slot.pipeline.prepare,
            text,
            photo,
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

    @app.post(
        "/extract", response_model=ExtractResponse, responses=_ERRORS, dependencies=auth, tags=["inference"]
    )
    async def extract(
        request: Request,
        response: Response,
        text: TextField,
        image: ImageField = None,
        pairs: Annotated[
            Literal["all", "typed"],
            Form(
                description="Which entity pairs to classify: 'all' (every ordered pair of distinct "
                "entities: n entities make n(n-1) pairs) or 'typed' (only the pairs whose head and tail "
                "types some relation of the RE model joins, as its labels name them: "
                "/per/loc/place_of_residence joins a PER head to a LOC tail)",
            ),
        ] = "all",
        include_none: Annotated[
            bool, Form(description="Also list the pairs whose most probable relation is 'None'")
        ] = False,
    ) -> ExtractResponse:
        """The entities of a tweet (as /ner) and the relations between them (as /re), in one call.

        The picture is decoded once and read by both models; the entity pairs go to the RE model as
        one batch. Both models must be loaded.
        """
        ner_slot, re_slot = available("ner", "re")
        ner, relation_model = ner_slot.pipeline, re_slot.pipeline
        assert isinstance(ner, NERPipeline) and isinstance(relation_model, REPipeline)
        check_text(text)
        if pairs == "typed" and relation_model.relation_types is None:
            raise FieldError(
                "pairs",
                f"pairs=typed needs relation labels that name entity types (/head/tail/name); the RE model "
                f"{relation_model.name} has {relation_model.labels[:3]}...: use pairs=all",
            )
        photo = await read_photo(image)
        started = time.perf_counter()
        ner_prepared, found, ner_timings = await infer(
            ner_slot, settings.request_timeout_s, ner.prepare, text, photo
        )
        entities: list[Entity] = found
        allowed = relation_model.relation_types
        chosen = [
            (h, t)
            for h, head in enumerate(entities)
            for t, tail in enumerate(entities)
            if h != t and (pairs == "all" or (allowed is not None and (head.type, tail.type) in allowed))
        ]
        if len(chosen) > settings.max_relation_pairs:
            hint = "; pairs=typed asks only the pairs a relation can join" if pairs == "all" else ""
            raise ApiError(
                413,
                f"the text has {len(entities)} entities, {len(chosen)} pairs to classify: more than the "
                f"limit of {settings.max_relation_pairs} pairs (IMM_MAX_RELATION_PAIRS){hint}",
            )
        stages = dict(ner_prepared.stages)
        stages["queue_wait"], stages["inference"] = ner_timings.queue_wait_s, ner_timings.inference_s
        group: list[Prepared] = []
        results: list[Relation] = []
        re_batch = 0
        if chosen:
            spans = [
                ((entities[h].start, entities[h].end), (entities[t].start, entities[t].end))
                for h, t in chosen
            ]
            left = max(0.0, settings.request_timeout_s - (time.perf_counter() - started))
            group, results, re_timings = await infer(
                re_slot, left, relation_model.prepare_pairs, text, photo, spans
            )
            re_batch = re_timings.batch_size
            for name, seconds in [
                *group[0].stages.items(),
                ("queue_wait", re_timings.queue_wait_s),
                ("inference", re_timings.inference_s),
            ]:
                stages[name] = stages.get(name, 0.0) + seconds
        image_used = ner_prepared.image_used or any(item.image_used for item in group)
        answered(
            request,
            response,
            "/extract",
            started,
            stages,
            {
                "model": f"{ner.name} {relation_model.name}",
                "batch": ner_timings.batch_size,
                "re_batch": re_batch,
                "image": image_used,
                "words": len(ner_prepared.words),
                "pairs": len(chosen),
            },
        )
        return ExtractResponse(
            entities=[EntityOut(**vars(e)) for e in entities],
            relations=[
                RelationOut(head=h, tail=t, relation=r.relation, score=r.score)
                for (h, t), r in zip(chosen, results)
                if include_none or r.relation != NO_RELATION
            ],
            image_used=image_used,
            truncated=ner_prepared.truncated or any(item.truncated for item in group),
            models=ExtractModels(ner=ner.name, re=relation_model.name),
            # Each model's own notes (a model that ignored the picture names itself), once each.
            notes=list(dict.fromkeys([*ner_prepared.notes, *(group[0].notes if group else [])])),
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
