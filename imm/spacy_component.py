"""IMM as a spaCy pipeline component, ``imm_ner`` (the ``spacy`` extra; registered as a
``spacy_factories`` entry point, so spaCy finds it without an import)::

    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("imm_ner")                               # the packaged bundles; or config={"weights": DIR}
    doc = nlp("Kevin Durant joins the Warriors")
    [(ent.text, ent.label_) for ent in doc.ents]          # IMM's types: PER, LOC, ORG, MISC
    doc._.relations                                       # [{"head": Span, "tail": Span, "relation", "score"}]

    doc = nlp.make_doc("Alice Smith is in Paris")         # with a picture: set it before the pipeline runs
    doc._.image = "photo.jpg"                             # its bytes, or a path
    doc = nlp(doc)

``weights`` is what ``imm.load`` takes: a directory with ``ner/`` and ``re/`` bundles (both: entities
and relations, ``extract``), or one NER bundle (entities only; ``doc._.relations`` stays ``None``).
Each entity's characters become a span with ``doc.char_span(..., alignment_mode="expand")``: the
tokens that hold them (IMM reads words its own way, so an entity may end inside a spaCy token).
``nlp.pipe`` sends the texts to the engine together, which batches them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from spacy.language import Language
from spacy.tokens import Doc, Span
from spacy.util import filter_spans

import imm
from engine.settings import DEFAULT_WEIGHTS

for _name in ("image", "relations"):
    if not Doc.has_extension(_name):
        Doc.set_extension(_name, default=None)


class IMMEntityRecognizer:
    """Sets ``doc.ents`` (and ``doc._.relations`` when an RE model is loaded) from IMM's answers."""

    def __init__(self, models: imm.IMM):
        self.models = models
        self.task = "extract" if {"ner", "re"} <= set(models.tasks) else "ner"

    def __call__(self, doc: Doc) -> Doc:
        (doc,) = self.pipe([doc], batch_size=1)
        return doc

    def pipe(self, docs: Iterable[Doc], batch_size: int = 32) -> Iterator[Doc]:
        docs = iter(docs)
        while chunk := list(islice(docs, batch_size)):
            # The engine refuses an empty text; a doc of spaces simply has no entities.
            answered = [doc for doc in chunk if doc.text.strip()]
            items = [{"text": doc.text, "image": doc._.image} for doc in answered]
            try:
                answers = list(self.models.pipe(items, task=self.task, batch_size=batch_size))
            except imm.PipeError as failure:  # a doc's own error, as nlp(doc) raises it
                raise failure.error from None
            for doc, answer in zip(answered, answers):
                self._annotate(doc, answer)
            for doc in chunk:
                if not doc.text.strip():
                    doc.ents = []
                    doc._.relations = [] if self.task == "extract" else None
            yield from chunk

    def _annotate(self, doc: Doc, answer: Any) -> None:
        spans: list[Span | None] = [
            doc.char_span(entity.start, entity.end, label=entity.type, alignment_mode="expand")
            for entity in answer.entities
        ]
        # Two entities expanded to the same token would overlap: spaCy's rule keeps the longer one.
        doc.ents = filter_spans([span for span in spans if span is not None])
        if self.task == "extract":
            doc._.relations = [
                {
                    "head": spans[relation.head],
                    "tail": spans[relation.tail],
                    "relation": relation.relation,
                    "score": relation.score,
                }
                for relation in answer.relations
                if spans[relation.head] is not None and spans[relation.tail] is not None
            ]

    def close(self) -> None:
        self.models.close()


@Language.factory("imm_ner", default_config={"weights": None})
def make_imm_ner(nlp: Language, name: str, weights: str | None) -> IMMEntityRecognizer:
    """The ``imm_ner`` component: the models of ``weights`` (default: the packaged bundles)."""
    return IMMEntityRecognizer(imm.load(weights or DEFAULT_WEIGHTS))
