"""Issue 36, point 2: the Python API as people coming from spaCy or Hugging Face expect it, on the
packaged bundles: ``nlp(text)``, ``to_dict()``/``to_json()`` on every answer, relations that carry
their entities, ``pipe`` defaulting to what is loaded, a failing item named by its index."""

from __future__ import annotations

import asyncio
import inspect
import json

import pytest

import imm
from engine import answers
from engine.settings import DEFAULT_WEIGHTS

TWEET = "Kevin Durant joins the Golden State Warriors in San Francisco"
HEAD, TAIL = (0, 12), (23, 44)  # Kevin Durant, Golden State Warriors


@pytest.fixture(scope="module")
def nlp():
    with imm.load(intra_op_threads=1) as loaded:  # the packaged bundles: NER and RE
        yield loaded


@pytest.fixture(scope="module")
def only_re():
    with imm.load(DEFAULT_WEIGHTS / "re", intra_op_threads=1) as loaded:
        yield loaded


def test_nlp_of_a_text_answers_what_the_loaded_models_can(nlp, only_re):
    assert nlp.default_task == "extract"
    answer = nlp(TWEET)
    assert isinstance(answer, imm.ExtractResponse) and answer == nlp.extract(TWEET)
    assert [relation.relation for relation in answer.relations] == ["/per/org/member_of"]
    assert only_re.tasks == ["re"] and only_re.default_task == "re"
    with pytest.raises(TypeError, match="RE needs the head and tail entities, call nlp.re"):
        only_re(TWEET)
    assert only_re.re(TWEET, HEAD, TAIL).relation == "/per/org/member_of"  # still answers as asked


def test_every_answer_is_json(nlp):
    answered = [nlp.ner(TWEET), nlp.re(TWEET, HEAD, TAIL), nlp(TWEET)]
    for answer in answered:
        as_dict = answer.to_dict()
        assert json.loads(json.dumps(as_dict)) == as_dict  # plain dicts, lists, strings, numbers
        assert json.loads(answer.to_json()) == as_dict
        assert type(answer).model_validate_json(answer.to_json(indent=2)) == answer
    extracted = answered[2].to_dict()
    assert "@" in extracted["models"]["re"] and extracted["entities"][0]["type"] == "PER"
    # Every answer type, parts and model statuses included, has them.
    models = [
        cls for _, cls in inspect.getmembers(answers, inspect.isclass) if cls.__module__ == answers.__name__
    ]
    assert len(models) == 8 and all(issubclass(cls, imm.Answer) for cls in models)


def test_relations_carry_their_head_and_tail_entities(nlp):
    answer = nlp(TWEET)
    (relation,) = answer.relations
    assert (
        relation.head_entity == answer.entities[relation.head] and relation.head_entity.text == "Kevin Durant"
    )
    assert relation.tail_entity == answer.entities[relation.tail]
    assert relation.tail_entity.text == "Golden State Warriors" and relation.tail_entity.type == "ORG"
    in_json = answer.to_dict()["relations"][0]
    assert (in_json["head"], in_json["head_entity"]["text"]) == (relation.head, "Kevin Durant")
    # The example /docs shows is a valid answer, entities in its relations included.
    (example,) = imm.ExtractResponse.model_json_schema()["examples"]
    shown = imm.ExtractResponse.model_validate(example)
    assert all(r.head_entity == shown.entities[r.head] for r in shown.relations)


def test_pipe_answers_what_is_loaded_unless_told(nlp, only_re):
    texts = [TWEET, "nothing here"]
    assert list(nlp.pipe(texts)) == [nlp(text) for text in texts]
    assert list(nlp.pipe(texts, task="ner")) == [nlp.ner(text) for text in texts]
    pair = {"text": TWEET, "head": HEAD, "tail": TAIL}
    assert list(only_re.pipe([pair])) == [only_re.re(**pair)]
    with pytest.raises(imm.ModelUnavailable, match="NER model"):
        list(only_re.pipe(texts, task="ner"))  # not loaded: the whole call's error, not an item's
    with pytest.raises(ValueError, match="errors must be 'raise' or 'return'"):
        nlp.pipe(texts, errors="ignore")


@pytest.mark.parametrize("batch_size", [2, 8])  # the failing item in a later chunk, or in the first
def test_a_failing_item_is_named_by_its_index(nlp, batch_size):
    items = [TWEET, "nothing here", "   ", TWEET, 42]
    got = []
    with pytest.raises(imm.PipeError, match=r"^item 2: text is empty or only whitespace") as caught:
        for answer in nlp.pipe(items, batch_size=batch_size):
            got.append(answer)
    failure = caught.value
    assert (
        failure.index == 2
        and isinstance(failure.error, imm.InvalidInput)
        and failure.__cause__ is failure.error
    )
    assert got == [nlp(TWEET), nlp("nothing here")]  # the answers before it are not lost

    returned = list(nlp.pipe(items, batch_size=batch_size, errors="return"))
    assert [type(answer) for answer in returned] == [
        imm.ExtractResponse,
        imm.ExtractResponse,
        imm.PipeError,
        imm.ExtractResponse,
        imm.PipeError,
    ]
    assert returned[:2] == got and returned[3] == nlp(TWEET)
    assert str(returned[2]) == str(failure) and returned[2].index == 2
    assert (
        returned[4].index == 4 and isinstance(returned[4].error, TypeError) and "not int" in str(returned[4])
    )


def test_the_async_api_has_the_same_conventions():
    async def scenario() -> None:
        async with await imm.load_async(ner=DEFAULT_WEIGHTS / "ner", re="", intra_op_threads=1) as only_ner:
            assert only_ner.default_task == "ner"
            answer = await only_ner(TWEET)
            assert (
                answer == await only_ner.ner(TWEET)
                and answer.to_dict()["entities"][0]["text"] == "Kevin Durant"
            )
            returned = [a async for a in only_ner.pipe([TWEET, ""], errors="return")]
            assert returned[0] == answer and isinstance(returned[1], imm.PipeError) and returned[1].index == 1
            with pytest.raises(imm.PipeError, match="^item 1: "):
                _ = [a async for a in only_ner.pipe([TWEET, ""])]

    asyncio.run(scenario())
