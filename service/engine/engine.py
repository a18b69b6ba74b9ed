"""The engine: one object per served set of models, with every serving policy in it and no HTTP.

``Engine(settings)`` holds the NER and RE models of the settings' bundles, the preprocessing
thread pool, each model's batcher and inference thread, and the metrics. Its calls are
``await engine.ner(text, image)``, ``re(text, head, tail, image)`` and ``extract(text, image)``,
each returning the API's typed answer (``service.schemas``) and raising the engine's own errors
(``service.engine.errors``, and ``model.preprocessing``'s picture errors); front ends (the HTTP app,
Ray, the Python API, the corpus command) map those to what their callers see.

A call goes: admission into the model's queue (refused at once when full or when the queue could
not answer it by its deadline) -> preprocessing in the pool (words, pieces, the picture decoded at
most once per image step) -> the batcher (one runtime call per batch, in the model's inference
thread) -> the answer. ``extract`` goes that way twice: the NER model, then all its entity pairs as
one group through the RE model, the picture decoded once for both.

Deadlines: each call takes ``deadline`` (``time.monotonic()`` seconds; ``deadline_in`` makes one),
capped by ``IMM_REQUEST_TIMEOUT_S``. A call whose deadline passes before its batch starts leaves the
queue unanswered by the model (``DeadlineExceeded``). Cancellation: cancelling the task of a call
(the HTTP layer does when its client disconnects) takes it out of the pool's queue or the model's
queue; its rows never reach the model. Both are counted (``imm_dropped_total``), as are rows computed
for callers that had gone (``imm_abandoned_rows_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from model.data.mnre import NO_RELATION
from model.tasks import TASKS
from service.engine.batcher import BatchTimings, Ticket
from service.engine.errors import (
    DeadlineExceeded,
    InputTooLarge,
    InvalidInput,
    ModelUnavailable,
    Overloaded,
    ShuttingDown,
)
from service.engine.models import ModelSlot, load_model
from service.engine.pipeline import Entity, NERPipeline, Prepared, Relation, REPipeline, RequestPicture
from service.observability import Metrics
from service.schemas import (
    EntityOut,
    ExtractModels,
    ExtractResponse,
    ModelStatus,
    NERResponse,
    RelationOut,
    REResponse,
)
from service.settings import Settings

log = logging.getLogger("service")

T = TypeVar("T")
Pairs = Literal["all", "typed"]
Span = tuple[int, int]


@dataclass
class Trace:
    """What the engine measured of one call, for a front end's logs and timing headers: seconds per
    stage (decode, tokenise, queue_wait, inference, total) and details (model, batch size, ...)."""

    stages: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Admission:
    """One request's tickets on the queues of the models it needs (``Engine.admit``)."""

    def __init__(self, tickets: dict[str, Ticket]):
        self._tickets = tickets

    def take(self, task: str) -> Ticket | None:
        """The ticket of ``task``'s model, handed to the call that uses it (None if none was taken)."""
        return self._tickets.pop(task, None)

    def release(self) -> None:
        """Gives back the tickets no call used (the request ended first, or needed fewer models)."""
        for ticket in self._tickets.values():
            ticket.release()
        self._tickets.clear()


def deadline_in(seconds: float | None) -> float | None:
    """The ``deadline`` of a call that may take ``seconds`` from now (None: the engine's default)."""
    return None if seconds is None else time.monotonic() + seconds


class Engine:
    """The served models and their policies (see the module's docstring)."""

    def __init__(self, settings: Settings | None = None, metrics: Metrics | None = None):
        self.settings = settings or Settings()
        self.metrics = metrics or Metrics()
        self.slots: dict[str, ModelSlot] = {task: ModelSlot(task) for task in TASKS}
        self.loaded = threading.Event()  # set when loading has finished (loaded, absent or failed)
        self._pool: ThreadPoolExecutor | None = None
        self._loader: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Starts loading the models in the background (``wait_loaded`` waits for it)."""
        if self._pool is not None:
            return
        self._pool = ThreadPoolExecutor(self.settings.preprocess_workers, thread_name_prefix="imm-preprocess")
        self._loader = asyncio.get_running_loop().create_task(self._load_all(), name="imm-loader")

    async def wait_loaded(self) -> None:
        """Returns once loading has finished (each model loaded and warmed up, absent or failed)."""
        if self._loader is None:
            await self.start()
        assert self._loader is not None
        await asyncio.shield(self._loader)

    async def warmup(self) -> None:
        """Starts the engine and waits until its models are loaded and warm (``IMM_WARMUP``)."""
        await self.wait_loaded()

    async def close(self) -> None:
        """Stops loading and the batchers; calls still waiting get ``ShuttingDown``."""
        self._closing = True
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loader
        for slot in self.slots.values():
            await slot.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> Engine:
        await self.warmup()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _load_all(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for task in TASKS:
                slot = self.slots[task]
                if await loop.run_in_executor(None, load_model, slot, self.settings, self.metrics) is None:
                    continue
                assert slot.batcher is not None and slot.pipeline is not None
                slot.batcher.start()
                slot.status, slot.detail = "ready", None
                self.metrics.model_info.labels(task, slot.pipeline.name, slot.provider).set(1)
        finally:
            self.loaded.set()
            self.metrics.ready.set(1 if self.is_ready else 0)
            states = ", ".join(f"{t}: {s.status}" for t, s in self.slots.items())
            (log.info if self.is_ready else log.error)(
                "loading finished (%s); ready: %s", states, self.is_ready
            )

    # -- state -----------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        """Loading finished and at least one model is warm; with ``IMM_READY_STRICT``, every model that
        the settings configure is."""
        if not self.loaded.is_set() or self._closing:
            return False
        if self.settings.ready_strict:
            configured = [slot for slot in self.slots.values() if slot.configured]
            return bool(configured) and all(slot.ready for slot in configured)
        return any(slot.ready for slot in self.slots.values())

    def status(self) -> dict[str, ModelStatus]:
        """Each model's state, name and what runs it."""
        return {
            task: ModelStatus(
                status=slot.status,
                detail=slot.detail,
                name=slot.pipeline.name if slot.pipeline else None,
                provider=slot.provider,
            )
            for task, slot in self.slots.items()
        }

    def piece_counts(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in sub-tokens, by the tokenizer of a ready model (``TextEncoder.piece_counts``):
        the order in which to send many texts so that batches pad little."""
        slot = next((slot for slot in self.slots.values() if slot.ready), None)
        if slot is None:
            raise ModelUnavailable("no model is ready")
        return slot.pipeline.preprocessor.text.piece_counts(texts)

    def refresh_gauges(self) -> None:
        """Sets the queue-depth gauges from the batchers (before metrics are read)."""
        for task, slot in self.slots.items():
            if slot.batcher is not None:
                self.metrics.queue_depth.labels(task).set(slot.batcher.depth)

    def available(self, *tasks: str) -> list[ModelSlot]:
        """The slots of ``tasks``, or ``ModelUnavailable`` naming each model that is not ready."""
        problems, loading = [], False
        for task in tasks:
            slot = self.slots[task]
            if slot.status == "loading":
                loading = True
                problems.append(f"the {task.upper()} model is still loading")
            elif not slot.ready:
                problems.append(f"the {task.upper()} model is not available: {slot.detail}")
        if problems:
            raise ModelUnavailable("; ".join(problems), loading=loading)
        return [self.slots[task] for task in tasks]

    def admit(self, tasks: Sequence[str], deadline: float | None = None) -> Admission:
        """Admits a call needing ``tasks``' models now, or raises ``Overloaded``: for a front end to
        refuse a request before it reads its body, and hand the ``Admission`` to the call (then the
        request counts in the queues' expected wait from this moment, not from when its body has
        arrived). Models that are not ready are left to the call (its ``ModelUnavailable`` names them)."""
        deadline = self._deadline(deadline)
        tickets: dict[str, Ticket] = {}
        for task in tasks:
            slot = self.slots[task]
            if slot.batcher is None or not slot.ready:
                continue
            try:
                tickets[task] = slot.batcher.admit(deadline)
            except Overloaded:
                self.metrics.rejected.labels(task).inc()
                for ticket in tickets.values():
                    ticket.release()
                raise
        return Admission(tickets)

    def check_admission(self, tasks: Sequence[str], deadline: float | None = None) -> None:
        """``Overloaded`` (counted) when ``admit`` would refuse a call needing ``tasks``' models now;
        takes no place in the queues: for a front end deciding on a request's head alone."""
        deadline = self._deadline(deadline)
        for task in tasks:
            slot = self.slots[task]
            if slot.batcher is None or not slot.ready:
                continue
            try:
                slot.batcher.check_admission(deadline)
            except Overloaded:
                self.metrics.rejected.labels(task).inc()
                raise

    def _deadline(self, deadline: float | None) -> float:
        cap = time.monotonic() + self.settings.request_timeout_s
        return cap if deadline is None else min(deadline, cap)

    def _check_text(self, text: str) -> None:
        if len(text) > self.settings.max_text_chars:
            raise InputTooLarge(
                f"text is {len(text)} characters long, more than the limit of {self.settings.max_text_chars}"
            )

    # -- calls -----------------------------------------------------------------------------
    async def ner(
        self,
        text: str,
        image: bytes | None = None,
        *,
        deadline: float | None = None,
        trace: Trace | None = None,
        admission: Admission | None = None,
    ) -> NERResponse:
        """The named entities of ``text`` (with the picture ``image``, encoded bytes, when given)."""
        started = time.perf_counter()
        deadline = self._deadline(deadline)
        (slot,) = self.available("ner")
        pipeline = slot.pipeline
        assert isinstance(pipeline, NERPipeline)
        self._check_text(text)
        photo = RequestPicture(image) if image is not None else None
        prepared, entities, timings = await self._infer(
            slot, deadline, admission, pipeline.prepare, text, photo
        )
        self._observe(
            "/ner",
            started,
            {**prepared.stages, **_batch_stages(timings)},
            trace,
            model=pipeline.name,
            batch=timings.batch_size,
            image=prepared.image_used,
            words=len(prepared.words),
        )
        return NERResponse(
            entities=[EntityOut(**vars(e)) for e in entities],
            image_used=prepared.image_used,
            truncated=prepared.truncated,
            model=pipeline.name,
            notes=prepared.notes,
        )

    async def re(
        self,
        text: str,
        head: Span,
        tail: Span,
        image: bytes | None = None,
        *,
        deadline: float | None = None,
        trace: Trace | None = None,
        admission: Admission | None = None,
    ) -> REResponse:
        """The relation between the entities at character spans ``head`` and ``tail`` of ``text``."""
        started = time.perf_counter()
        deadline = self._deadline(deadline)
        (slot,) = self.available("re")
        pipeline = slot.pipeline
        assert isinstance(pipeline, REPipeline)
        self._check_text(text)
        photo = RequestPicture(image) if image is not None else None
        prepared, result, timings = await self._infer(
            slot, deadline, admission, pipeline.prepare, text, photo, tuple(head), tuple(tail)
        )
        assert isinstance(result, Relation)
        self._observe(
            "/re",
            started,
            {**prepared.stages, **_batch_stages(timings)},
            trace,
            model=pipeline.name,
            batch=timings.batch_size,
            image=prepared.image_used,
            words=len(prepared.words),
        )
        return REResponse(
            relation=result.relation,
            score=result.score,
            scores=result.scores,
            image_used=prepared.image_used,
            truncated=prepared.truncated,
            model=pipeline.name,
            notes=prepared.notes,
        )

    async def extract(
        self,
        text: str,
        image: bytes | None = None,
        *,
        pairs: Pairs = "typed",
        include_none: bool = False,
        deadline: float | None = None,
        trace: Trace | None = None,
        admission: Admission | None = None,
    ) -> ExtractResponse:
        """The entities of ``text`` (as ``ner``) and the relations between them (as ``re``), in one call.

        ``pairs``: "typed" (the default) classifies only the pairs whose head and tail types some
        relation of the RE model joins, "all" every ordered pair of distinct entities. Pairs whose best relation is
        'None' are left out unless ``include_none``. The picture is decoded once for both models.
        """
        started = time.perf_counter()
        deadline = self._deadline(deadline)
        ner_slot, re_slot = self.available("ner", "re")
        ner, relation_model = ner_slot.pipeline, re_slot.pipeline
        assert isinstance(ner, NERPipeline) and isinstance(relation_model, REPipeline)
        self._check_text(text)
        if pairs not in ("all", "typed"):
            raise InvalidInput("pairs", f"pairs must be 'all' or 'typed', not {pairs!r}")
        if pairs == "typed" and relation_model.relation_types is None:
            raise InvalidInput(
                "pairs",
                f"pairs=typed needs relation labels that name entity types (/head/tail/name); the RE model "
                f"{relation_model.name} has {relation_model.labels[:3]}...: use pairs=all",
            )
        photo = RequestPicture(image) if image is not None else None
        ner_prepared, entities, ner_timings = await self._infer(
            ner_slot, deadline, admission, ner.prepare, text, photo
        )
        chosen = self.entity_pairs(entities, pairs, relation_model)
        stages = {**ner_prepared.stages, **_batch_stages(ner_timings)}
        group: list[Prepared] = []
        results: list[Relation] = []
        re_batch = 0
        if chosen:
            spans = [
                ((entities[h].start, entities[h].end), (entities[t].start, entities[t].end))
                for h, t in chosen
            ]
            group, results, re_timings = await self._infer(
                re_slot, deadline, admission, relation_model.prepare_pairs, text, photo, spans
            )
            re_batch = re_timings.batch_size
            for name, seconds in [*group[0].stages.items(), *_batch_stages(re_timings).items()]:
                stages[name] = stages.get(name, 0.0) + seconds
        image_used = ner_prepared.image_used or any(item.image_used for item in group)
        self._observe(
            "/extract",
            started,
            stages,
            trace,
            model=f"{ner.name} {relation_model.name}",
            batch=ner_timings.batch_size,
            re_batch=re_batch,
            image=image_used,
            words=len(ner_prepared.words),
            pairs=len(chosen),
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

    def entity_pairs(
        self, entities: Sequence[Entity], pairs: Pairs, relation_model: REPipeline
    ) -> list[tuple[int, int]]:
        """The (head, tail) entity indices ``extract`` classifies; ``InputTooLarge`` past the limit."""
        allowed = relation_model.relation_types
        chosen = [
            (h, t)
            for h, head in enumerate(entities)
            for t, tail in enumerate(entities)
            if h != t and (pairs == "all" or (allowed is not None and (head.type, tail.type) in allowed))
        ]
        limit = self.settings.max_relation_pairs
        if len(chosen) > limit:
            hint = "; pairs=typed asks only the pairs a relation can join" if pairs == "all" else ""
            raise InputTooLarge(
                f"the text has {len(entities)} entities, {len(chosen)} pairs to classify: more than the "
                f"limit of {limit} pairs (IMM_MAX_RELATION_PAIRS){hint}"
            )
        return chosen

    # -- the path of one model call --------------------------------------------------------------
    async def _infer(
        self,
        slot: ModelSlot,
        deadline: float,
        admission: Admission | None,
        prepare: Callable[..., T],
        *args: Any,
    ) -> tuple[T, Any, BatchTimings]:
        """Admission, preprocessing in the pool, then the batcher.

        ``prepare`` makes one ``Prepared`` (one item) or a list of them (a group: one request to the
        batcher, run in one batch, answered together); the results come back in the same shape.
        """
        batcher = slot.batcher
        if batcher is None or self._pool is None or self._closing:
            raise ShuttingDown("the engine is shutting down")
        loop = asyncio.get_running_loop()
        try:
            with batcher.incoming(deadline, admission.take(slot.task) if admission else None):
                preparing = loop.run_in_executor(self._pool, prepare, *args)
                try:
                    prepared = await asyncio.wait_for(preparing, max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    self.metrics.dropped.labels(slot.task, "deadline").inc()
                    raise DeadlineExceeded(
                        "the request's deadline passed while it was preprocessed"
                    ) from None
                except asyncio.CancelledError:
                    self.metrics.dropped.labels(slot.task, "cancelled").inc()
                    raise
            if isinstance(prepared, list):
                result, timings = await batcher.submit_group(prepared, deadline)
            else:
                result, timings = await batcher.submit(prepared, deadline)
        except Overloaded:
            self.metrics.rejected.labels(slot.task).inc()
            raise
        return prepared, result, timings

    def _observe(
        self,
        operation: str,
        started: float,
        stages: dict[str, float],
        trace: Trace | None,
        **details: Any,
    ) -> None:
        self.metrics.observe_stages(operation, stages)
        if trace is not None:
            trace.stages = {**stages, "total": time.perf_counter() - started}
            trace.details = details


def _batch_stages(timings: BatchTimings) -> dict[str, float]:
    return {"queue_wait": timings.queue_wait_s, "inference": timings.inference_s}
