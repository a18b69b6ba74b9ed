"""What the service does with a request, per task: preprocess one, infer and decode a batch.

``prepare`` (in the preprocessing thread pool) turns raw text and a request's picture (``RequestPicture``)
into model inputs through the project's one preprocessing path (``model.preprocessing``), decoding
the picture at most once per picture recipe, so that ``POST /extract`` decodes it once for both models
when they share one (the same size, normalisation and runtime); ``run_batch`` (in the
model's inference thread) hands the batch to the model's runtime (``engine.runtimes``: ONNX
Runtime, or PyTorch on a GPU), which pads it, runs the model once and decodes the CRF, and turns
each row into its answer, so a request gets the same answer alone or in any batch.

Torch-free: only numpy, tokenizers, Pillow and the torch-free project modules (the PyTorch
runtime is imported by ``engine.runtimes`` only when it is chosen).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.answers import EntityOut, NERResponse, REResponse, Span
from engine.errors import InvalidInput
from engine.runtimes import ModelPicture, NEROutput, Runtime, jpeg_header
from export.bundle import Bundle
from model.data.mnre import NO_RELATION
from model.decoding import bio_spans, char_spans
from model.preprocessing import EncodedText, ImageProcessor, Preprocessor, split_words

log = logging.getLogger("service.pipeline")

WARMUP_TEXT = "RT @imm_ai : Alice Smith visits Paris with the Lakers today ! #warmup http://t.co/x :)"


@dataclass
class RequestPicture:
    """A request's picture as sent (its bytes), and the ``ModelPicture`` each picture recipe made of it.

    A step (``Pipeline.picture_recipe``: image size, normalisation, pixel limit, and whether the runtime
    decodes JPEGs itself) decodes it at most once: models that share a step get the same ``ModelPicture``
    object, so ``POST /extract`` decodes the picture once for its NER and RE models.
    """

    data: bytes
    pictures: dict[PictureRecipe, ModelPicture] = field(default_factory=dict)
    headers_checked: set[ImageProcessor] = field(default_factory=set)  # processors that read its header


@dataclass(frozen=True)
class PictureRecipe:
    """What turns a request's picture into a model's ``ModelPicture``: whether the runtime decodes
    JPEGs itself, and the image processor (size, normalisation, pixel limit: a frozen dataclass,
    equal when its settings are). Models with equal steps share one decoded picture."""

    runtime_decodes_jpeg: bool
    processor: ImageProcessor


@dataclass
class Prepared:
    """One request's model inputs plus what is needed to answer it."""

    text: str
    words: list[tuple[str, int, int]]  # (word, start, end) for the words that fit the window
    encoded: EncodedText
    picture: ModelPicture | None  # normalised pixels, or an undecoded JPEG for a runtime that decodes them
    truncated: bool
    stages: dict[str, float] = field(default_factory=dict)  # decode, tokenise seconds
    notes: list[str] = field(default_factory=list)  # what the client should know (an ignored picture)

    @property
    def image_used(self) -> bool:
        return self.picture is not None


@dataclass(frozen=True)
class Entity:
    text: str
    type: str
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class Relation:
    relation: str
    score: float
    scores: dict[str, float]


class Pipeline:
    """The task-independent half: image decoding, batching, warm-up."""

    task: str = ""

    def __init__(self, bundle: Bundle, preprocessor: Preprocessor, runtime: Runtime):
        if bundle.task != self.task:
            raise ValueError(f"the bundle holds a {bundle.task!r} model, not {self.task!r}")
        self.bundle = bundle
        self.name = bundle.name
        self.labels = list(bundle.labels)
        self.runtime = runtime
        self.preprocessor = preprocessor
        self.budget = bundle.preprocessing.max_seq_len - 2  # pieces between [CLS] and [SEP]
        # A model trained on text alone has its visual stream left out (export.onnx_export.visual_stream).
        self.visual = bool(bundle.manifest.get("visual_stream", True))
        self.ignored_picture_note = (
            f"the picture was not used: this {self.task.upper()} model was trained without pictures"
        )
        # What decides the picture a model gets; equal steps share one decoded picture.
        self.picture_recipe = PictureRecipe(runtime.decodes_jpeg, preprocessor.image)

    def words(self, text: str, limit: int | None = None) -> list[tuple[str, int, int]]:
        """The text's words as the model reads them (``split_words``, then words longer than the
        window cut into pieces); only the first ``limit`` of ``split_words``' words when given."""
        return self.preprocessor.text.split_long_words(self._split_words(text)[:limit])

    @staticmethod
    def _split_words(text: str) -> list[tuple[str, int, int]]:
        words = split_words(text)
        if not words:
            raise InvalidInput("text", "text is empty or only whitespace")
        return words

    def _model_picture(
        self, picture: RequestPicture | None, stages: dict[str, float], notes: list[str]
    ) -> ModelPicture | None:
        """The picture for the model: decoded pixels (JPEG in draft mode: never a full-size decode of
        a large picture), JPEG bytes for a runtime that decodes them on its device, or None (no
        picture, or a model that ignores them: then only its header is read). A picture already decoded
        by another model with the same picture recipe is not decoded again."""
        if picture is None:
            return None
        if not self.visual:
            # Not decoded, but its header is still checked (format, pixel limit: no pixel is read),
            # so that a file that is no picture gets the same 415 / 413 whichever model is served.
            if self.preprocessor.image not in picture.headers_checked:
                self.preprocessor.image.header(picture.data)
                picture.headers_checked.add(self.preprocessor.image)
            notes.append(self.ignored_picture_note)
            return None
        if self.picture_recipe in picture.pictures:
            return picture.pictures[self.picture_recipe]
        started = time.perf_counter()
        model_picture: ModelPicture | None = None
        if self.runtime.decodes_jpeg:
            model_picture = jpeg_header(picture.data, self.preprocessor.image.max_pixels)
        if model_picture is None:
            model_picture = self.preprocessor.image(picture.data)
        stages["decode"] = time.perf_counter() - started
        picture.pictures[self.picture_recipe] = model_picture
        return model_picture

    def run_batch(self, batch: Sequence[Prepared]) -> list[Any]:
        output = self.runtime.infer([p.encoded for p in batch], [p.picture for p in batch])
        return self.decode(batch, output)

    def answer(self, prepared: Prepared, result: Any) -> Any:
        """The task's answer (its ``TaskSpec.answer`` type) to the request ``prepared``, whose row the
        model computed as ``result`` (an item of ``decode``'s list)."""
        raise NotImplementedError

    def decode(self, batch: Sequence[Prepared], output: Any) -> list[Any]:
        raise NotImplementedError

    def warmup_items(self) -> list[Prepared]:
        raise NotImplementedError

    def warmup(self, max_batch_size: int) -> float:
        """Runs a text-only, an image and a full batch (pre-sizing the runtime's memory); seconds taken."""
        started = time.perf_counter()
        items = self.warmup_items()
        size = self.preprocessor.config.image_size
        grey = np.zeros((3, size, size), dtype=np.float32)
        with_image = [Prepared(i.text, i.words, i.encoded, grey, i.truncated) for i in items]
        self.run_batch(items[:1])
        self.run_batch(with_image[:1])
        full = [(items if n % 2 else with_image)[n % len(items)] for n in range(max_batch_size)]
        self.run_batch(full)
        return time.perf_counter() - started


class NERPipeline(Pipeline):
    """Words in, entities with character offsets and CRF confidences out."""

    task = "ner"

    def prepare(self, text: str, picture: RequestPicture | None) -> Prepared:
        stages: dict[str, float] = {}
        started = time.perf_counter()
        # Each word takes at least one piece, so words past the budget can never fit: leaving them
        # out changes nothing but the cost (and the encoder still reports the truncation).
        fits = self.budget + 1
        # ``words(text, limit=fits + 1)`` and the encoding of its first ``fits``, in one tokenizer pass.
        words, encoded = self.preprocessor.text.split_and_encode(self._split_words(text)[: fits + 1], fits)
        stages["tokenise"] = time.perf_counter() - started
        notes: list[str] = []
        model_picture = self._model_picture(picture, stages, notes)
        truncated = encoded.truncated or len(words) > fits
        return Prepared(text, words[: encoded.num_words], encoded, model_picture, truncated, stages, notes)

    def answer(self, prepared: Prepared, entities: list[Entity]) -> NERResponse:
        return NERResponse(
            entities=[EntityOut(**vars(e)) for e in entities],
            image_used=prepared.image_used,
            truncated=prepared.truncated,
            model=self.name,
            notes=prepared.notes,
        )

    def decode(self, batch: Sequence[Prepared], output: NEROutput) -> list[list[Entity]]:
        results = []
        for item, path, confidence in zip(batch, output.tags, output.confidence):
            spans = bio_spans([self.labels[t] for t in path.tolist()])  # Python ints index faster
            offsets = [(start, end) for _, start, end in item.words]
            entities = []
            for (kind, first, last), (_, start, end) in zip(spans, char_spans(spans, offsets)):
                score = float(np.mean(confidence[first:last]))
                entities.append(Entity(item.text[start:end], kind, start, end, round(score, 6)))
            results.append(entities)
        return results

    def warmup_items(self) -> list[Prepared]:
        long_text = " ".join([WARMUP_TEXT] * 20)  # past the window: the largest shapes
        return [self.prepare(WARMUP_TEXT, None), self.prepare(long_text, None)]


def entity_words(
    text: str, words: Sequence[tuple[str, int, int]], start: int, end: int, role: str
) -> tuple[int, int]:
    """The word span ``[first, last)`` that character offsets ``[start, end)`` cover, or a 422 naming the field.

    Whitespace at the edges of the span is ignored; otherwise both ends must fall on word
    boundaries as ``split_words`` cuts the text (``"Obama"`` in ``"Obama's"`` is fine, ``"Oba"`` is not).
    """
    start_field, end_field = f"{role}_start", f"{role}_end"
    for name, value in ((start_field, start), (end_field, end)):
        if not 0 <= value <= len(text):
            raise InvalidInput(name, f"{name}={value} is outside the text (0 to {len(text)} characters)")
    if start >= end:
        raise InvalidInput(
            end_field,
            f"the {role} span is empty: {end_field}={end} must be greater than {start_field}={start}",
        )
    inside = [i for i, (_, word_start, word_end) in enumerate(words) if word_start < end and word_end > start]
    if not inside:
        raise InvalidInput(
            start_field, f"the {role} span [{start}, {end}) covers no word of the text, only whitespace"
        )
    first, last = inside[0], inside[-1]
    word, word_start, word_end = words[first]
    if start > word_start:
        raise InvalidInput(
            start_field, f"{start_field}={start} falls inside the word {word!r} at [{word_start}, {word_end})"
        )
    word, word_start, word_end = words[last]
    if end < word_end:
        raise InvalidInput(
            end_field, f"{end_field}={end} falls inside the word {word!r} at [{word_start}, {word_end})"
        )
    return first, last + 1


#: A relation label that names its entity types, MNRE's way: /head type/tail type/name.
_TYPED_RELATION = re.compile(r"^/([^/]+)/([^/]+)/[^/]+$")


def check_pair(head_words: Span, tail_words: Span, head: Span, tail: Span) -> None:
    """A 422 for an entity pair the model never saw in training: the same words, or spans that cross
    (``head_words``, ``tail_words``: the word spans that the character spans ``head``, ``tail`` cover).

    One span inside the other is a pair (MNRE holds 59 such train pairs and 3 valid ones: a place in
    the name of a venue, a first name in a full name); its markers are placed by
    ``TextEncoder.encode_relation``, the function training uses. Spans that overlap without one containing the other are in no
    MNRE pair (train or valid): refused, as identical spans are.
    """
    if head_words == tail_words:
        raise InvalidInput(
            "tail_start",
            f"the head [{head[0]}, {head[1]}) and tail [{tail[0]}, {tail[1]}) are the same words: "
            "a relation needs two entities",
        )
    (head_first, head_last), (tail_first, tail_last) = head_words, tail_words
    overlap = max(head_first, tail_first) < min(head_last, tail_last)
    nested = (head_first <= tail_first and tail_last <= head_last) or (
        tail_first <= head_first and head_last <= tail_last
    )
    if overlap and not nested:
        raise InvalidInput(
            "tail_start",
            f"the head [{head[0]}, {head[1]}) and tail [{tail[0]}, {tail[1]}) spans cross: they overlap "
            "without one containing the other (the training data has no such pair)",
        )


class REPipeline(Pipeline):
    """Text and an entity pair (character offsets) in, relation probabilities out."""

    task = "re"

    def __init__(self, bundle: Bundle, preprocessor: Preprocessor, runtime: Runtime):
        super().__init__(bundle, preprocessor, runtime)
        typed = [_TYPED_RELATION.match(label) for label in self.labels if label != NO_RELATION]
        #: (head type, tail type) pairs some relation of the model holds between, in NER's type names
        #: ("/per/loc/place_of_residence": PER, LOC); None when the labels do not name types.
        self.relation_types: frozenset[tuple[str, str]] | None = (
            frozenset((m.group(1).upper(), m.group(2).upper()) for m in typed if m)
            if typed and all(typed)
            else None
        )

    def prepare(self, text: str, picture: RequestPicture | None, head: Span, tail: Span) -> Prepared:
        return self.prepare_pairs(text, picture, [(head, tail)])[0]

    def prepare_pairs(
        self, text: str, picture: RequestPicture | None, pairs: Sequence[tuple[Span, Span]]
    ) -> list[Prepared]:
        """One ``Prepared`` per (head, tail) pair of character spans of ``text``: the words are split
        and the picture read once for all of them."""
        stages: dict[str, float] = {}
        started = time.perf_counter()
        words = self.words(text)
        plain = [w for w, _, _ in words]
        encoded = []
        for head, tail in pairs:
            head_words = entity_words(text, words, *head, role="head")
            tail_words = entity_words(text, words, *tail, role="tail")
            check_pair(head_words, tail_words, head, tail)
            encoded.append(self.preprocessor.text.encode_relation(plain, head_words, tail_words))
        stages["tokenise"] = time.perf_counter() - started
        notes: list[str] = []
        model_picture = self._model_picture(picture, stages, notes)
        # The stages are the group's, counted once (on its first item).
        return [
            Prepared(text, words, item, model_picture, item.truncated, stages if n == 0 else {}, list(notes))
            for n, item in enumerate(encoded)
        ]

    def answer(self, prepared: Prepared, result: Relation) -> REResponse:
        return REResponse(
            relation=result.relation,
            score=result.score,
            scores=result.scores,
            image_used=prepared.image_used,
            truncated=prepared.truncated,
            model=self.name,
            notes=prepared.notes,
        )

    def decode(self, batch: Sequence[Prepared], output: np.ndarray) -> list[Relation]:
        results = []
        for row in output:
            best = int(row.argmax())
            scores = {label: round(float(p), 6) for label, p in zip(self.labels, row)}
            results.append(Relation(self.labels[best], round(float(row[best]), 6), scores))
        return results

    def warmup_items(self) -> list[Prepared]:
        head = (WARMUP_TEXT.index("Alice"), WARMUP_TEXT.index("Alice") + len("Alice"))
        tail = (WARMUP_TEXT.index("Paris"), WARMUP_TEXT.index("Paris") + len("Paris"))
        long_text = " ".join([WARMUP_TEXT] * 20)
        return [self.prepare(WARMUP_TEXT, None, head, tail), self.prepare(long_text, None, head, tail)]
