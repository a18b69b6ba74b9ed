"""The FastAPI app: ``POST /ner``, ``POST /re``, ``POST /extract``, ``/health``, ``/ready``,
``/metrics``, ``/docs``, and the demo page at ``/`` (``service/static/``, see docs/demo.md).

A request goes: request id and access log (``service.observability``) -> guard (API key, body size,
the client's deadline, and the engine's admission, all before the body is read: ``service.guard``)
-> the body, a form or JSON, read into the path's fields (``service.forms``) -> the route
(``service.routes``), which calls the app's ``Engine`` (``engine``: preprocessing, the model's queue
and batcher, the answer) until it answers or the client disconnects -> the JSON answer, or the
engine's error mapped to its status (``service.errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp

from engine import Engine, Overloaded
from engine.settings import Settings
from service.docs import install_docs
from service.errors import install_error_handlers
from service.guard import GuardMiddleware
from service.observability import INFERENCE_ENDPOINTS, Metrics, RequestContextMiddleware, new_request_id
from service.routes import MODELS_OF_PATH, STATIC_DIR, inference, operations

DESCRIPTION = """
Multimodal named entity recognition and relation extraction on tweets (IMM), served on ONNX Runtime.

* Offsets are **Unicode code points** into the exact text sent: `text[start:end] == entity.text`
  (in JavaScript, count with `Array.from(text)`, not UTF-16 units).
* Send the fields as a form (`multipart/form-data`, the picture a file part `image`) or as JSON
  (`application/json`, the picture's bytes in base64 in `image_base64`).
* The image is optional; without one the model reads the text alone.
* Text longer than the model's window is answered on its first window, with `truncated: true`.
* `POST /extract` answers both at once: the entities, and the relations between them.
* `X-Request-Timeout: SECONDS` says how long you will wait: a request that could not be answered in
  time is refused at once (503, Retry-After), before its body is read.
"""


class ServiceApp(FastAPI):
    """FastAPI with the service's own ASGI layers (the guard, the request context) outside FastAPI's
    whole stack: a request refused before its body (401, 413, an early 503) costs those layers only,
    not FastAPI's error, telemetry, body-limit and routing layers (under overload refusals outnumber
    answers)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._outer_middleware: list[tuple[type, dict[str, Any]]] = []
        self._outer_layers: dict[type, Any] = {}  # each outer layer, once the stack is built

    def add_outer_middleware(self, layer: type, **options: Any) -> None:
        """Wraps everything added so far, ``add_middleware``'s layers and FastAPI's own included."""
        self._outer_middleware.append((layer, options))

    def build_middleware_stack(self) -> ASGIApp:
        app = super().build_middleware_stack()
        for layer, options in self._outer_middleware:
            app = self._outer_layers[layer] = layer(app, **options)
        return app

    def refuse_early(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None
    ) -> tuple[Overloaded, str] | None:
        """For the connection layer (``service.server``), on a request's head alone: the guard's
        admission refusal (``GuardMiddleware.refuse_early``) and the request id to answer it with,
        counted and logged as the request context counts and logs any answer; None when the request
        is to go through the app."""
        guard, context = (
            self._outer_layers.get(GuardMiddleware),
            self._outer_layers.get(RequestContextMiddleware),
        )
        if guard is None or context is None:  # not started yet
            return None
        started = time.perf_counter()
        error = guard.refuse_early(path, headers)
        if error is None:
            return None
        request_id = new_request_id(headers)
        context.record(method, path, 503, time.perf_counter() - started, request_id, client)
        return error, request_id


async def freeze_heap_when_loaded(engine: Engine) -> None:
    """Once the models are loaded, moves every object alive then (the models' sessions, tokenizers,
    modules: hundreds of thousands) out of the garbage collector's reach (``gc.freeze``). Otherwise
    each full collection walks them all while holding the GIL: 37-94 ms in which the event loop
    answers nothing (measured under overload on one core: the largest of /health's delays). For a
    process that serves and does nothing else, not for a library inside someone's program."""
    await engine.wait_loaded()
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None, engine: Engine | None = None, *, freeze_heap: bool = False
) -> ServiceApp:
    """A new app for ``settings`` (default: from the environment), serving ``engine`` (default: a new
    one for the settings, started and closed with the app; models load when it starts).
    ``freeze_heap``: the process serves this app alone (``freeze_heap_when_loaded``)."""
    settings = settings or (engine.settings if engine is not None else Settings())
    owned = engine is None
    engine = engine or Engine(settings, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owned:
            await engine.start()
        if settings.workers > 1:
            # One of several processes on a shared port: take no connection before the models are
            # warm, or the kernel would hand this process requests that the ready ones could answer.
            await engine.wait_loaded()
        freezing = asyncio.create_task(freeze_heap_when_loaded(engine)) if freeze_heap else None
        try:
            yield
        finally:
            if freezing is not None:
                freezing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await freezing
            if owned:
                await engine.close()
            engine.metrics.process_exiting()

    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app = ServiceApp(
        title="IMM inference service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # install_docs: Swagger UI from this server, not from a CDN
        redoc_url=None,
    )
    app.state.engine = engine
    install_error_handlers(app)
    # Documents the bearer scheme in /docs; the key is enforced by GuardMiddleware before parsing.
    auth = [Depends(HTTPBearer(auto_error=False))] if api_key else []
    app.include_router(inference, dependencies=auth)
    app.include_router(operations)
    app.add_outer_middleware(
        GuardMiddleware,
        paths=INFERENCE_ENDPOINTS,
        max_body_bytes=settings.max_upload_bytes,
        api_key=api_key,
        body_timeout_s=settings.body_timeout_s,
        retry_after_s=settings.retry_after_s,
        admit=lambda path, deadline: engine.admit(MODELS_OF_PATH[path], deadline),
        check=lambda path, deadline: engine.check_admission(MODELS_OF_PATH[path], deadline),
    )
    app.add_outer_middleware(
        RequestContextMiddleware,
        metrics=engine.metrics,
        endpoints=(*INFERENCE_ENDPOINTS, "/health", "/ready", "/metrics"),
    )
    install_docs(app, favicon_url="/static/favicon.svg")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
