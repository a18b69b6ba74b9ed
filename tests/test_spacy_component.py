"""Issue 36: IMM as a spaCy component, ``nlp.add_pipe("imm_ner")`` on ``spacy.blank("en")`` (no spaCy
model is downloaded), on the default bundles. Needs the ``spacy`` extra (``make install`` has it)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

spacy = pytest.importorskip("spacy", reason="the spacy extra is not installed: pip install -e '.[spacy]'")

import imm  # noqa: E402
from engine.settings import DEFAULT_WEIGHTS  # noqa: E402
from imm.spacy_component import make_imm_ner  # noqa: E402
from tests.conftest import jpeg_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TWEET = "Kevin Durant joins the Golden State Warriors in San Francisco"


@pytest.fixture(scope="module")
def nlp():
    pipeline = spacy.blank("en")
    pipeline.add_pipe("imm_ner")  # the packaged bundles: NER and RE
    yield pipeline
    pipeline.get_pipe("imm_ner").close()


def test_doc_ents_are_imm_entities_with_imm_types(nlp):
    doc = nlp(TWEET)
    answer = nlp.get_pipe("imm_ner").models.ner(TWEET)
    assert [(ent.start_char, ent.end_char, ent.label_) for ent in doc.ents] == [
        (entity.start, entity.end, entity.type) for entity in answer.entities
    ]
    assert {ent.label_ for ent in doc.ents} <= {"PER", "LOC", "ORG", "MISC"} and len(doc.ents) == 3


def test_relations_point_at_the_docs_entities(nlp):
    doc = nlp(TWEET)
    (relation,) = doc._.relations
    assert (relation["head"].text, relation["tail"].text) == ("Kevin Durant", "Golden State Warriors")
    assert relation["relation"] == "/per/org/member_of" and 0 < relation["score"] <= 1
    assert relation["head"] in doc.ents and relation["tail"] in doc.ents


def test_ner_alone_leaves_relations_unset():
    pipeline = spacy.blank("en")
    pipeline.add_pipe("imm_ner", config={"weights": str(DEFAULT_WEIGHTS / "ner")})
    try:
        doc = pipeline("Alice Smith is in Paris")
        assert [ent.text for ent in doc.ents] == ["Alice Smith", "Paris"] and doc._.relations is None
    finally:
        pipeline.get_pipe("imm_ner").close()


def test_an_entity_ending_inside_a_token_expands_to_the_whole_token(nlp):
    """IMM reads words its own way: an entity that ends inside a spaCy token takes the whole token."""
    component = nlp.get_pipe("imm_ner")
    doc = nlp.make_doc("Parisians love Paris")
    entities = [imm.EntityOut(text="Paris", type="LOC", start=0, end=5, score=0.9)]
    models = {"ner": "m", "re": "m"}
    answer = imm.ExtractResponse(
        entities=entities, relations=[], image_used=False, truncated=False, models=models
    )
    component._annotate(doc, answer)
    assert [(ent.text, ent.label_) for ent in doc.ents] == [("Parisians", "LOC")]


def test_a_picture_goes_through_doc_image_as_bytes_or_a_path(nlp, tmp_path):
    picture = tmp_path / "photo.jpg"
    picture.write_bytes(jpeg_bytes())
    for image in (picture.read_bytes(), str(picture)):
        doc = nlp.make_doc("Alice Smith is in Paris")
        doc._.image = image
        assert [ent.text for ent in nlp(doc).ents] == ["Alice Smith", "Paris"]
    doc = nlp.make_doc("Alice Smith is in Paris")
    doc._.image = b"not a picture"  # read by the engine, refused with the API's picture error
    with pytest.raises(imm.ImageError):
        nlp(doc)


def test_pipe_answers_in_order_and_an_empty_text_has_no_entities(nlp):
    docs = list(nlp.pipe(["Alice Smith is in Paris", "   ", TWEET, ""], batch_size=3))
    assert [[ent.text for ent in doc.ents] for doc in docs] == [
        ["Alice Smith", "Paris"],
        [],
        ["Kevin Durant", "Golden State Warriors", "San Francisco"],
        [],
    ]
    assert docs[1]._.relations == []


def test_the_entry_point_names_the_factory():
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    module, _, attribute = entry_points["spacy_factories"]["imm_ner"].partition(":")
    assert getattr(importlib.import_module(module), attribute) is make_imm_ner
    assert spacy.language.Language.has_factory("imm_ner")


def test_spacy_finds_the_component_without_importing_it():
    """What a user does: no ``import imm`` before ``add_pipe`` (the installed entry point)."""
    if "imm_ner" not in {entry.name for entry in importlib.metadata.entry_points(group="spacy_factories")}:
        pytest.skip("this environment's install predates the entry point: make install registers it")
    script = (
        "import spacy; nlp = spacy.blank('en'); nlp.add_pipe('imm_ner'); "
        "print([(e.text, e.label_) for e in nlp('Alice Smith is in Paris').ents])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[('Alice Smith', 'PER'), ('Paris', 'LOC')]"
