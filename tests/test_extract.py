"""``POST /extract`` (entities, then the relation of their pairs, in one call) and nested entity pairs
in ``/re`` (issue 14, parts 1 and 2), on the small exported test bundles.

Answers are checked against the service's own ``/ner`` and ``/re`` (themselves checked against
``model.evaluate`` in tests/test_service.py), and nested pairs against the training path's inputs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.preprocessing import split_words
from service import create_app
from tests.conftest import jpeg_bytes, synthetic_ner_examples
from tests.test_service import (
    ServerThread,
    assert_clean_error,
    image_file,
    make_settings,
    metric_value,
    started,
)

DATA_DIR = Path(os.environ.get("IMM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

# Texts in which the test NER model finds several entities (checked below). Its RE model reads the
# relation off the tail's word list, with a city or team anywhere in the text pulling every pair
# towards one: the first text's pairs all get one, the last text's pairs none ("None").
TEXTS = [
    "bob jones at london with the knicks",
    "RT @fan: bob 👩‍👩‍👧 in london 🇬🇧 with the knicks today",
    "carol jones and dave at tokyo",
    "alice at the game with carol",
]


@pytest.fixture(scope="module")
def server(bundles) -> Iterator[tuple[str, Any]]:
    app = create_app(make_settings(bundles, max_batch_size=64))
    with ServerThread(app) as url:
        yield url, app


def relation_of(client: httpx.Client, text: str, head: dict, tail: dict, files: dict | None = None) -> dict:
    """What ``/re`` answers for two entities of an ``/extract`` or ``/ner`` answer."""
    offsets = {
        "head_start": head["start"],
        "head_end": head["end"],
        "tail_start": tail["start"],
        "tail_end": tail["end"],
    }
    answer = client.post("/re", data={"text": text, **offsets}, files=files)
    assert answer.status_code == 200, answer.text
    return answer.json()


# --- /extract: the answers --------------------------------------------------------------------------


@pytest.mark.parametrize("with_photo", [False, True])
def test_extract_answers_what_ner_then_re_on_every_pair_answer(client, with_photo):
    photo = jpeg_bytes(640, 480, seed=3)
    files = image_file(photo) if with_photo else None
    pairs_seen = 0
    for text in TEXTS:
        ner = client.post("/ner", data={"text": text}, files=files).json()
        answer = client.post(
            "/extract", data={"text": text, "pairs": "all", "include_none": "true"}, files=files
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["entities"] == ner["entities"], text
        entities = body["entities"]
        assert len(entities) >= 2, (
            f"the test model finds too few entities in {text!r}: the test proves nothing"
        )
        # Every ordered pair of distinct entities, head then tail in text order, each /re's answer.
        assert [(r["head"], r["tail"]) for r in body["relations"]] == [
            (h, t) for h in range(len(entities)) for t in range(len(entities)) if h != t
        ]
        for found in body["relations"]:
            alone = relation_of(client, text, entities[found["head"]], entities[found["tail"]], files)
            assert found["relation"] == alone["relation"], (text, found)
            assert found["score"] == pytest.approx(alone["score"], abs=1e-6)
            pairs_seen += 1
        assert body["image_used"] is with_photo and body["truncated"] is False and body["notes"] == []
        assert body["models"] == {"ner": ner["model"], "re": alone["model"]}
    assert pairs_seen >= 8


def test_none_relations_are_left_out_unless_asked_and_typed_pairs_follow_the_labels(client):
    related = client.post("/extract", data={"text": TEXTS[0], "pairs": "all"}).json()
    assert [(e["text"], e["type"]) for e in related["entities"]] == [
        ("bob jones", "PER"),
        ("london", "LOC"),
        ("knicks", "ORG"),
    ]
    relations = {(r["head"], r["tail"]): r["relation"] for r in related["relations"]}
    assert len(relations) == 6 and "None" not in relations.values()
    assert relations[(0, 1)] == "/per/loc/place_of_residence" and relations[(0, 2)] == "/per/org/member_of"
    unrelated = client.post("/extract", data={"text": TEXTS[3], "pairs": "all"}).json()
    assert [e["text"] for e in unrelated["entities"]] == ["alice", "carol"] and unrelated["relations"] == []
    asked = client.post("/extract", data={"text": TEXTS[3], "pairs": "all", "include_none": "true"}).json()
    assert [(r["head"], r["tail"], r["relation"]) for r in asked["relations"]] == [
        (0, 1, "None"),
        (1, 0, "None"),
    ]
    # The test RE model's labels join PER to LOC and PER to ORG: only the pairs headed by bob jones.
    typed = client.post("/extract", data={"text": TEXTS[0], "pairs": "typed"}).json()
    assert [(r["head"], r["tail"]) for r in typed["relations"]] == [(0, 1), (0, 2)]
    assert typed["relations"] == [r for r in related["relations"] if r["head"] == 0]


def test_one_entity_or_none_asks_the_re_model_nothing(server, client):
    batcher = server[1].state.engine.slots["re"].batcher
    calls: list[int] = []
    run_batch = batcher.run_batch
    batcher.run_batch = lambda items: calls.append(len(items)) or run_batch(items)
    try:
        for text, count in (("paris", 1), ("great game today !", 0)):
            body = client.post("/extract", data={"text": text}).json()
            assert len(body["entities"]) == count and body["relations"] == []
    finally:
        batcher.run_batch = run_batch
    assert calls == []


def test_the_picture_is_decoded_once_and_the_pairs_go_to_the_re_model_as_one_batch(server, client):
    """Both models read the same decoded pixels (one decode), and the RE batcher gets the pairs as one
    batch: one run_batch call of n(n-1) rows, not n(n-1) requests."""
    state = server[1].state.engine
    ner, relation = state.slots["ner"].pipeline, state.slots["re"].pipeline
    assert ner.picture_recipe == relation.picture_recipe  # the same image size and normalisation
    decodes: list[int] = []
    batches: dict[str, list[list[Any]]] = {"ner": [], "re": []}
    saved = {}
    for task, pipeline in (("ner", ner), ("re", relation)):
        image = pipeline.preprocessor.image
        saved[task] = (pipeline.preprocessor, image, state.slots[task].batcher.run_batch)
        pipeline.preprocessor.image = lambda data, image=image: decodes.append(len(data)) or image(data)
        batcher = state.slots[task].batcher
        batcher.run_batch = lambda items, task=task, run=batcher.run_batch: (
            batches[task].append(items) or run(items)
        )
    try:
        photo = jpeg_bytes(400, 300, seed=5)
        answer = client.post(
            "/extract",
            data={"text": TEXTS[0], "pairs": "all", "include_none": "true"},
            files=image_file(photo),
        )
    finally:
        for task, (preprocessor, image, run_batch) in saved.items():
            preprocessor.image = image
            state.slots[task].batcher.run_batch = run_batch
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert decodes == [len(photo)]
    (ner_batch,), (re_batch,) = batches["ner"], batches["re"]
    assert len(re_batch) == len(body["relations"]) == 6
    assert all(item.picture is ner_batch[0].picture for item in re_batch)  # the same array, not a copy
    assert answer.headers["server-timing"].count("decode;") == 1
    metrics = client.get("/metrics").text
    for stage in ("decode", "tokenise", "queue_wait", "inference", "total"):
        assert metric_value(metrics, "imm_stage_seconds_count", task="extract", stage=stage) >= 1
    assert metric_value(metrics, "imm_requests_total", endpoint="/extract", status="200") >= 1


def test_concurrent_extracts_share_batches_and_equal_sequential_answers(server, client):
    url, app = server
    texts = TEXTS + [" ".join(e.words) for e in synthetic_ner_examples(9, seed=21)]
    sequential = [client.post("/extract", data={"text": t, "include_none": "true"}).json() for t in texts]
    sizes: list[int] = []
    batcher = app.state.engine.slots["re"].batcher
    run_batch = batcher.run_batch
    batcher.run_batch = lambda items: sizes.append(len(items)) or run_batch(items)

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(
                *(http.post("/extract", data={"text": t, "include_none": "true"}) for t in texts * 3)
            )

    try:
        answers = asyncio.run(all_at_once())
    finally:
        batcher.run_batch = run_batch
    for number, answer in enumerate(answers):
        got, want = answer.json(), sequential[number % len(texts)]
        assert got["entities"] == [
            {**e, "score": pytest.approx(e["score"], abs=1e-6)} for e in want["entities"]
        ]
        assert got["relations"] == [
            {
                **r,
                "score": pytest.approx(r["score"], abs=1e-6),
                "head_entity": got["entities"][r["head"]],
                "tail_entity": got["entities"][r["tail"]],
            }
            for r in want["relations"]
        ]
    groups = sum(len(w["relations"]) > 0 for w in sequential) * 3
    assert len(sizes) < groups, "no two /extract requests ever shared an RE batch"


# --- /extract: the errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "field"),
    [
        ({"text": ""}, 422, "text"),
        ({"text": "  \u200b "}, 422, "text"),
        ({"pairs": "all"}, 422, "text"),  # the text left out
        ({"text": "a " * 20_000}, 413, None),
        ({"text": "alice in paris", "pairs": "some"}, 422, "pairs"),
        ({"text": "alice in paris", "include_none": "perhaps"}, 422, "include_none"),
    ],
)
def test_bad_fields_are_named(client, data, status, field):
    assert_clean_error(client.post("/extract", data=data), status, field)


@pytest.mark.parametrize(
    ("files", "status"),
    [
        (image_file(b"hello, not a picture", "notes.txt", "text/plain"), 415),
        (image_file(jpeg_bytes(160, 120)[:1500]), 422),  # truncated
    ],
)
def test_bad_images_get_their_status(client, files, status):
    assert_clean_error(client.post("/extract", data={"text": TEXTS[0]}, files=files), status, "image")


def test_more_pairs_than_the_limit_is_413_and_typed_pairs_may_fit(bundles):
    async def scenario() -> None:
        app = create_app(make_settings(bundles, max_relation_pairs=2, warmup=False))
        async with started(app) as http:
            refused = await http.post(
                "/extract", data={"text": TEXTS[0], "pairs": "all"}
            )  # 3 entities: 6 pairs
            assert_clean_error(refused, 413)
            detail = refused.json()["detail"]
            assert (
                "3 entities, 6 pairs" in detail and "IMM_MAX_RELATION_PAIRS" in detail and "typed" in detail
            )
            typed = await http.post("/extract", data={"text": TEXTS[0], "pairs": "typed"})  # 2 pairs
            assert typed.status_code == 200, typed.text

    asyncio.run(scenario())


def test_typed_pairs_need_labels_that_name_types(bundles):
    async def scenario() -> None:
        app = create_app(make_settings(bundles, warmup=False))
        async with started(app) as http:
            app.state.engine.slots["re"].pipeline.relation_types = None  # as for labels such as "works_for"
            answer = await http.post("/extract", data={"text": TEXTS[0], "pairs": "typed"})
            assert_clean_error(answer, 422, "pairs")
            assert_clean_error(
                await http.post("/extract", data={"text": TEXTS[0]}), 422, "pairs"
            )  # the default
            all_pairs = await http.post("/extract", data={"text": TEXTS[0], "pairs": "all"})
            assert all_pairs.status_code == 200

    asyncio.run(scenario())


def test_extract_needs_ner_and_answers_without_a_switched_off_re(bundles, tmp_path):
    async def scenario() -> None:
        for overrides, status, named, absent in (
            (
                {"re_bundle": tmp_path / "nowhere"},
                503,
                ["RE model is not available", "nowhere does not exist"],
                "NER",
            ),
            (
                {"ner_bundle": tmp_path / "nowhere"},
                503,
                ["NER model is not available", "nowhere does not exist"],
                "RE",
            ),
            ({"ner_bundle": None}, 404, ["NER model is not available", "IMM_NER_BUNDLE is empty"], "RE"),
            ({"ner_bundle": None, "re_bundle": None}, 404, ["NER model", "IMM_NER_BUNDLE"], None),
        ):
            app = create_app(make_settings(bundles, warmup=False, **overrides))
            async with started(app) as http:
                answer = await http.post("/extract", data={"text": TEXTS[0]})
                assert_clean_error(answer, status)
                detail = answer.json()["detail"]
                assert all(part in detail for part in named), detail
                if absent:
                    assert f"{absent} model" not in detail
        # RE switched off (IMM_RE_BUNDLE empty): the entities, no relations, and a note saying so.
        async with started(create_app(make_settings(bundles, warmup=False, re_bundle=None))) as http:
            answer = await http.post("/extract", data={"text": TEXTS[0]})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["entities"] and body["relations"] == [] and body["models"]["re"] is None
            assert any("IMM_RE_BUNDLE is empty" in note for note in body["notes"]), body["notes"]

    asyncio.run(scenario())


def test_the_api_key_guards_extract_and_openapi_documents_it(bundles):
    async def scenario() -> None:
        app = create_app(make_settings(bundles, api_key="s3cret", warmup=False))
        async with started(app) as http:
            assert_clean_error(await http.post("/extract", data={"text": "alice"}), 401)
            right = await http.post(
                "/extract", data={"text": TEXTS[0]}, headers={"Authorization": "Bearer s3cret"}
            )
            assert right.status_code == 200 and right.json()["relations"]
            schema = (await http.get("/openapi.json")).json()
            operation = schema["paths"]["/extract"]["post"]
            assert {"400", "401", "413", "415", "422", "503"} <= set(operation["responses"])
            example = schema["components"]["schemas"]["ExtractResponse"]["examples"][0]
            assert example["relations"][0]["head"] == 0 and example["models"]["re"]
            form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
            assert form["properties"]["pairs"]["enum"] == ["typed", "all"]
            assert form["properties"]["pairs"]["default"] == "typed"

    asyncio.run(scenario())


# --- /extract with models that disagree about pictures ------------------------------------------------


@pytest.fixture(scope="module")
def text_only_re_bundle(tmp_path_factory, trained_re_checkpoint) -> Path:
    """The test RE model, as if trained without pictures: its bundle leaves the visual stream out."""
    from export import export_bundle
    from model.checkpoint import load_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("text_only_re")
    model, preprocessor = load_checkpoint(trained_re_checkpoint)
    checkpoint = save_checkpoint(root / "ckpt", model, preprocessor, training_args={"images": None})
    return export_bundle(checkpoint, root / "bundle", log=lambda _: None)


def relation_alone(relation: dict) -> dict:
    """What the RE model answered of a relation, without the copies of its entities (the NER model's)."""
    return {key: relation[key] for key in ("head", "tail", "relation", "score")}


def test_a_model_that_ignores_the_picture_is_named_in_the_notes(bundles, text_only_re_bundle):
    async def scenario() -> None:
        app = create_app(make_settings({**bundles, "re": text_only_re_bundle}, warmup=False))
        async with started(app) as http:
            photo = image_file(jpeg_bytes(640, 480, seed=8))
            body = (await http.post("/extract", data={"text": TEXTS[0]}, files=photo)).json()
            assert body["image_used"] is True  # the NER model read it
            assert body["notes"] == ["the picture was not used: this RE model was trained without pictures"]
            assert body["relations"]
            # The RE model answers as without the picture; the NER model as /ner with it.
            plain = (await http.post("/extract", data={"text": TEXTS[0]})).json()
            assert [relation_alone(r) for r in body["relations"]] == [
                relation_alone(r) for r in plain["relations"]
            ]
            alone = (await http.post("/ner", data={"text": TEXTS[0]}, files=photo)).json()
            assert body["entities"] == alone["entities"]

    asyncio.run(scenario())


# --- nested entity pairs in /re ------------------------------------------------------------------------


def served_and_trained(pipeline, example) -> tuple[Any, Any]:
    """The inputs the server makes of an MNRE-style example sent as text and character offsets, and those
    training makes of it (``model.data.dataset.encode_example``, what ``IMMDataset`` encodes)."""
    from model.data.dataset import encode_example

    text = " ".join(example.words)
    starts = np.cumsum([0] + [len(word) + 1 for word in example.words])

    def chars(span: tuple[int, int]) -> tuple[int, int]:
        return int(starts[span[0]]), int(starts[span[1] - 1] + len(example.words[span[1] - 1]))

    served = pipeline.prepare(text, None, chars(example.head), chars(example.tail)).encoded
    return served, encode_example(pipeline.preprocessor, example)


def nested(example) -> bool:
    (hs, he), (ts, te) = example.head, example.tail
    return example.head != example.tail and ((hs <= ts and te <= he) or (ts <= hs and he <= te))


def test_a_nested_pair_is_served_with_the_training_inputs_and_answers_as_the_model(
    server, client, trained_re_checkpoint
):
    from model.checkpoint import load_checkpoint
    from model.data import REExample
    from model.evaluate import predict

    pipeline = server[1].state.engine.slots["re"].pipeline
    text = "alice smith moved to paris #win"
    words = tuple(w for w, _, _ in split_words(text))
    examples = [
        REExample(words=words, head=(0, 2), tail=(0, 1), relation="None", image_id=None),  # same start
        REExample(words=words, head=(1, 2), tail=(0, 2), relation="None", image_id=None),  # same end
        REExample(words=words, head=(0, 5), tail=(4, 5), relation="None", image_id=None),  # inside
    ]
    for example in examples:
        assert nested(example)
        served, trained = served_and_trained(pipeline, example)
        np.testing.assert_array_equal(served.input_ids, trained.input_ids)
        np.testing.assert_array_equal(served.marker_index, trained.marker_index)
    # The markers stand where encode_relation puts them: both openings before the shared first word.
    served, _ = served_and_trained(pipeline, examples[0])
    tokens = pipeline.preprocessor.text.tokenizer.decode(served.input_ids.tolist(), skip_special_tokens=False)
    assert tokens.startswith("[CLS] <s> <o> alice </o> smith </s> moved"), tokens
    # The answers are the model's on those inputs (model.evaluate, in PyTorch).
    model, preprocessor = load_checkpoint(trained_re_checkpoint)
    expected = predict(model, preprocessor, examples, batch_size=4)
    for example, relation in zip(examples, expected):
        (hs, he), (ts, te) = (
            (split_words(text)[first][1], split_words(text)[last - 1][2])
            for first, last in (example.head, example.tail)
        )
        data = {"text": text, "head_start": hs, "head_end": he, "tail_start": ts, "tail_end": te}
        answer = client.post("/re", data=data)
        assert answer.status_code == 200, answer.text
        assert answer.json()["relation"] == relation


def test_nested_pairs_of_the_mnre_valid_split_get_the_training_inputs(server):
    """Every nested pair of MNRE's valid split (where ../shared/data or $IMM_DATA_DIR has it): the ids
    the server makes from the text and offsets are those training made from the reader's example."""
    from model.data import read_mnre

    path = DATA_DIR / "mnre" / "valid.txt"
    if not path.exists():
        pytest.skip(f"{path} not available")
    pipeline = server[1].state.engine.slots["re"].pipeline
    pairs = [example for example in read_mnre(path) if nested(example)]
    assert pairs, "the valid split holds nested pairs (3 when this test was written)"
    for example in pairs:
        served, trained = served_and_trained(pipeline, example)
        np.testing.assert_array_equal(served.input_ids, trained.input_ids)
        np.testing.assert_array_equal(served.marker_index, trained.marker_index)


RE_TEXT = "alice smith moved to paris 🇫🇷 !"


def pair_form(head: tuple[int, int], tail: tuple[int, int]) -> dict:
    """The /re form for RE_TEXT and two character spans."""
    return {
        "text": RE_TEXT,
        "head_start": head[0],
        "head_end": head[1],
        "tail_start": tail[0],
        "tail_end": tail[1],
    }


@pytest.mark.parametrize(
    ("head", "tail"),
    [
        ((0, 11), (0, 5)),  # the tail is the head's first word
        ((6, 11), (0, 11)),  # the head is the tail's last word
        ((0, 26), (21, 26)),  # the tail inside the head
    ],
)
def test_re_answers_nested_pairs(client, head, tail):
    answer = client.post("/re", data=pair_form(head, tail))
    assert answer.status_code == 200, answer.text
    assert answer.json()["relation"] in answer.json()["scores"]


@pytest.mark.parametrize(
    ("head", "tail", "message"),
    [
        ((0, 11), (0, 11), "same words"),
        ((0, 11), (0, 12), "same words"),  # a trailing space is not a word
        ((0, 11), (6, 17), "cross"),  # "alice smith" and "smith moved"
        ((12, 26), (0, 17), "cross"),
    ],
)
def test_re_refuses_identical_or_crossing_spans(client, head, tail, message):
    answer = client.post("/re", data=pair_form(head, tail))
    assert_clean_error(answer, 422, "tail_start")
    assert message in answer.json()["detail"][0]["msg"]
