"""The engine: one object per served set of models, with every serving policy in it and no HTTP.

``Engine(settings)`` holds the NER and RE models of the settings' bundles, the preprocessing
thread pool, each model's batcher and inference thread, and the metrics. Its calls are
``await engine.ner(text, image)``, ``re(text, head, tail, image)`` and ``extract(text, image)``,
each returning the API's typed answer (``engine.answers``) and raising the engine's own errors
(``engine.errors``, and ``model.preprocessing``'s picture errors); front ends (the HTTP app,
Ray, the Python API, the corpus command) map those to what their callers see.

A call goes: admission into the model's queue (refused at once when full or when the queue could
not answer it by its deadline) -> preprocessing in the pool (words, pieces, the picture decoded at
most once per image step; a lone call of a short text without a picture is preprocessed on the
event loop itself, which costs less than the hand-off to the pool and back) -> the batcher (one
runtime call per batch, in the model's inference thread) -> the answer. ``extract`` goes that way twice: the NER model, then all its entity pairs as
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
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.answers import (
    EntityOut,
    ExtractModels,
    ExtractResponse,
    ModelStatus,
    NERResponse,
    Pairs,
    RelationOut,
    REResponse,
    Span,
)
from engine.batcher import BatchTimings, Ticket
from engine.errors import (
    DeadlineExceeded,
    InputTooLarge,
    InvalidInput,
    ModelSwitchedOff,
    ModelUnavailable,
    Overloaded,
    ShuttingDown,
)
from engine.metrics import EngineMetrics
from engine.models import ModelSlot, load_model
from engine.pipeline import Entity, NERPipeline, Prepared, Relation, REPipeline, RequestPicture
from engine.settings import Settings
from model.data.mnre import NO_RELATION
from model.tasks import TASKS

log = logging.getLogger("service")

T = TypeVar("T")


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

    def __init__(self, settings: Settings | None = None, metrics: EngineMetrics | None = None):
        self.settings = settings or Settings()
        self.metrics = metrics or EngineMetrics()
        self.slots: dict[str, ModelSlot] = {task: ModelSlot(task) for task in TASKS}
        self.loaded = threading.Event()  # set when loading has finished (loaded, absent or failed)
        self._pool: ThreadPoolExecutor | None = None
        self._loader: asyncio.Task[None] | None = None
        self._closing = False
        #: Calls preprocessed on the event loop (``_prepare_here``), not in the pool.
        self.prepared_here = 0

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
        """The slots of ``tasks``, or ``ModelUnavailable`` naming each model that is not ready
        (``ModelSwitchedOff`` when one of them is switched off by the settings)."""
        problems, loading, switched_off = [], False, False
        for task in tasks:
            slot = self.slots[task]
            switched_off |= not slot.configured
            if slot.status == "loading":
                loading = True
                problems.append(f"the {task.upper()} model is still loading")
            elif not slot.ready:
                problems.append(f"the {task.upper()} model is not available: {slot.detail}")
        if problems:
            raise (ModelSwitchedOff if switched_off else ModelUnavailable)(
                "; ".join(problems), loading=loading
            )
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

    def check_text(self, text: str) -> None:
        """A text the tokenizer can take: a string, within ``max_text_chars`` (checked on characters,
        before anything reads it whole), and Unicode (a lone surrogate, as a truncated emoji's
        ``"\\ud83d"`` escape leaves, is refused, not handed to the tokenizer)."""
        if not isinstance(text, str):
            raise InvalidInput("text", f"text must be a string, not {type(text).__name__}")
        if len(text) > self.settings.max_text_chars:
            raise InputTooLarge(
                f"text is {len(text)} characters long, more than the limit of {self.settings.max_text_chars}"
            )
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise InvalidInput(
                    "text", f"text holds a lone surrogate at character {error.start} (not Unicode text)"
                ) from None

    def _begin(
        self, text: str, image: bytes | None, deadline: float | None
    ) -> tuple[float, RequestPicture | None]:
        """What every call checks first: its text (``check_text``) and deadline (capped); its picture."""
        self.check_text(text)
        return self._deadline(deadline), RequestPicture(image) if image is not None else None

    # -- calls -----------------------------------------------------------------------------
    async def ner(self, text: str, image: bytes | None = None, **call: Any) -> NERResponse:
        """The named entities of ``text`` (with the picture ``image``, encoded bytes, when given).
        ``call``: ``deadline``, ``trace``, ``admission`` (see ``run``)."""
        return await self.run("ner", text, image, **call)

    async def re(
        self, text: str, head: Span, tail: Span, image: bytes | None = None, **call: Any
    ) -> REResponse:
        """The relation between the entities at character spans ``head`` and ``tail`` of ``text``."""
        return await self.run("re", text, image, inputs={"head": tuple(head), "tail": tuple(tail)}, **call)

    async def run(
        self,
        task: str,
        text: str,
        image: bytes | None = None,
        *,
        inputs: dict[str, Any] | None = None,
        deadline: float | None = None,
        trace: Trace | None = None,
        admission: Admission | None = None,
    ) -> Any:
        """The answer of ``task``'s model (its ``TaskSpec.answer``) for ``text``, the picture ``image``
        and the task's own ``inputs`` (RE: ``head``, ``tail``), which its pipeline's ``prepare`` takes:
        the one path of every single-model call."""
        started = time.perf_counter()
        (slot,) = self.available(task)
        deadline, picture = self._begin(text, image, deadline)
        pipeline = slot.pipeline
        prepare = functools.partial(pipeline.prepare, **(inputs or {}))
        prepared, result, timings = await self._infer(
            slot, deadline, admission, prepare, text, picture, inline=_cheap(text, picture)
        )
        self._observe(
            task,
            started,
            {**prepared.stages, **_batch_stages(timings)},
            trace,
            model=pipeline.name,
            batch=timings.batch_size,
            image=prepared.image_used,
            words=len(prepared.words),
        )
        return pipeline.answer(prepared, result)

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
        if not self.slots["re"].configured:  # relations switched off: the entities alone, with a note
            return await self._entities_alone(text, image, deadline, trace, admission)
        ner_slot, re_slot = self.available("ner", "re")
        deadline, picture = self._begin(text, image, deadline)
        ner, relation_model = ner_slot.pipeline, re_slot.pipeline
        assert isinstance(ner, NERPipeline) and isinstance(relation_model, REPipeline)
        self._check_pairs(pairs, relation_model)
        ner_prepared, entities, ner_timings = await self._infer(
            ner_slot, deadline, admission, ner.prepare, text, picture, inline=_cheap(text, picture)
        )
        chosen = self.entity_pairs(entities, pairs, relation_model)
        stages = {**ner_prepared.stages, **_batch_stages(ner_timings)}
        group, results, re_batch = await self._classify_pairs(
            re_slot, deadline, admission, text, picture, entities, chosen, stages
        )
        image_used = ner_prepared.image_used or any(item.image_used for item in group)
        self._observe(
            "extract",
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
        found = [EntityOut(**vars(e)) for e in entities]
        return ExtractResponse(
            entities=found,
            relations=_relations(found, chosen, results, include_none),
            image_used=image_used,
            truncated=ner_prepared.truncated or any(item.truncated for item in group),
            models=ExtractModels(ner=ner.name, re=relation_model.name),
            # Each model's own notes (a model that ignored the picture names itself), once each.
            notes=list(dict.fromkeys([*ner_prepared.notes, *(group[0].notes if group else [])])),
        )

    @staticmethod
    def _check_pairs(pairs: Pairs, relation_model: REPipeline) -> None:
        if pairs not in ("all", "typed"):
            raise InvalidInput("pairs", f"pairs must be 'all' or 'typed', not {pairs!r}")
        if pairs == "typed" and relation_model.relation_types is None:
            raise InvalidInput(
                "pairs",
                f"pairs=typed needs relation labels that name entity types (/head/tail/name); the RE model "
                f"{relation_model.name} has {relation_model.labels[:3]}...: use pairs=all",
            )

    async def _classify_pairs(
        self,
        re_slot: ModelSlot,
        deadline: float,
        admission: Admission | None,
        text: str,
        picture: RequestPicture | None,
        entities: Sequence[Entity],
        chosen: list[tuple[int, int]],
        stages: dict[str, float],
    ) -> tuple[list[Prepared], list[Relation], int]:
        """The RE model's answers for the ``chosen`` entity pairs, as one group (one batch); its stage
        times are added to ``stages``. Returns the group, the relations and the RE batch's size."""
        if not chosen:
            return [], [], 0
        spans = [
            ((entities[h].start, entities[h].end), (entities[t].start, entities[t].end)) for h, t in chosen
        ]
        relation_model = re_slot.pipeline
        assert isinstance(relation_model, REPipeline)
        group, results, timings = await self._infer(
            re_slot, deadline, admission, relation_model.prepare_pairs, text, picture, spans
        )
        for name, seconds in [*group[0].stages.items(), *_batch_stages(timings).items()]:
            stages[name] = stages.get(name, 0.0) + seconds
        return group, results, timings.batch_size

    async def _entities_alone(
        self,
        text: str,
        image: bytes | None,
        deadline: float | None,
        trace: Trace | None,
        admission: Admission | None,
    ) -> ExtractResponse:
        """``extract``'s answer when the RE model is switched off: ``ner``'s entities, no relations,
        and a note saying why."""
        found = await self.ner(text, image, deadline=deadline, trace=trace, admission=admission)
        return ExtractResponse(
            entities=found.entities,
            relations=[],
            image_used=found.image_used,
            truncated=found.truncated,
            models=ExtractModels(ner=found.model, re=None),
            notes=[*found.notes, f"relations are off: {self.slots['re'].detail}"],
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
        inline: bool = False,
    ) -> tuple[T, Any, BatchTimings]:
        """Admission, preprocessing in the pool, then the batcher.

        ``prepare`` makes one ``Prepared`` (one item) or a list of them (a group: one request to the
        batcher, run in one batch, answered together); the results come back in the same shape.
        ``inline``: ``prepare`` is cheap (a short text, no picture), so that while the model has no
        other request (``Batcher.alone``) it runs on the event loop instead (``_prepare_here``).
        """
        batcher = slot.batcher
        if batcher is None or self._pool is None or self._closing:
            raise ShuttingDown("the engine is shutting down")
        try:
            with batcher.incoming(deadline, admission.take(slot.task) if admission else None):
                if inline and batcher.alone:
                    prepared = self._prepare_here(slot.task, deadline, prepare, *args)
                else:
                    prepared = await self._prepare_in_pool(slot.task, deadline, prepare, *args)
            if isinstance(prepared, list):
                result, timings = await batcher.submit_group(prepared, deadline)
            else:
                result, timings = await batcher.submit(prepared, deadline)
        except Overloaded:
            self.metrics.rejected.labels(slot.task).inc()
            raise
        return prepared, result, timings

    async def _prepare_in_pool(self, task: str, deadline: float, prepare: Callable[..., T], *args: Any) -> T:
        preparing = asyncio.get_running_loop().run_in_executor(self._pool, prepare, *args)
        try:
            return await asyncio.wait_for(preparing, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.metrics.dropped.labels(task, "deadline").inc()
            raise DeadlineExceeded("the request's deadline passed while it was preprocessed") from None
        except asyncio.CancelledError:
            self.metrics.dropped.labels(task, "cancelled").inc()
            raise

    def _prepare_here(self, task: str, deadline: float, prepare: Callable[..., T], *args: Any) -> T:
        """``prepare`` on the event loop's thread: for a short text without a picture while the model
        has no other request, whose tokenising (1-2 ms at most: ``INLINE_PREPARE_MAX_CHARS``,
        holding the GIL as it would in the pool) delays nobody, and costs less than the hand-off to
        the pool and back. The deadline is kept as the pool's way keeps it (a call past it, before
        or after, is dropped)."""
        if time.monotonic() < deadline:
            self.prepared_here += 1
            prepared = prepare(*args)
            if time.monotonic() < deadline:
                return prepared
        self.metrics.dropped.labels(task, "deadline").inc()
        raise DeadlineExceeded("the request's deadline passed while it was preprocessed")

    def _observe(
        self,
        task: str,
        started: float,
        stages: dict[str, float],
        trace: Trace | None,
        **details: Any,
    ) -> None:
        self.metrics.observe_stages(task, stages)
        if trace is not None:
            trace.stages = {**stages, "total": time.perf_counter() - started}
            trace.details = details


#: The longest text whose preprocessing may run on the event loop (``Engine._prepare_here``): a tweet
#: (at most 280 characters) fits; 300 characters take 1 ms to split and tokenise (tweets' text), 1.6 ms
#: at worst (a run of Chinese characters), on a loaded 2-core EPYC, while the pool's way holds the GIL
#: for most of that time too.
INLINE_PREPARE_MAX_CHARS = 300


def _cheap(text: str, picture: RequestPicture | None) -> bool:
    """Whether preparing ``text`` and ``picture`` for one model is cheap enough for the event loop."""
    return picture is None and len(text) <= INLINE_PREPARE_MAX_CHARS


def _batch_stages(timings: BatchTimings) -> dict[str, float]:
    return {"queue_wait": timings.queue_wait_s, "inference": timings.inference_s}


def _relations(
    entities: list[EntityOut], chosen: list[tuple[int, int]], results: list[Relation], include_none: bool
) -> list[RelationOut]:
    """``extract``'s relations: each classified pair with its entities (its 'None' only if asked)."""
    return [
        RelationOut(
            head=h,
            tail=t,
            relation=r.relation,
            score=r.score,
            head_entity=entities[h],
            tail_entity=entities[t],
        )
        for (h, t), r in zip(chosen, results)
        if include_none or r.relation != NO_RELATION
    ]
