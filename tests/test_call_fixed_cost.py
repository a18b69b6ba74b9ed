"""The fixed cost of a one-by-one call, cut without changing an answer: the shortcuts are each
checked to give what the long way gives, and counted where they are taken (never timed).

- NER's words and pieces in one tokenizer pass (``TextEncoder.split_and_encode``);
- the word shape of an ASCII word by whole-string tests;
- a lone short call preprocessed on the event loop instead of the pool (``Engine._prepare_here``);
- the sync API's hop to the engine's loop (``imm.api._run_on``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from pathlib import Path

import pytest

import engine.engine as engine_module
from engine import DeadlineExceeded, Engine
from imm.api import _run_on
from model.config import PreprocessingConfig
from model.data import read_twitter_conll
from model.preprocessing import Preprocessor, load_tokenizer, split_words, word_shape
from model.preprocessing.text import _shape_by_letter
from tests.conftest import jpeg_bytes, minilm_path
from tests.test_service import make_settings, metric_value

VALID_TWEETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "twitter2017" / "valid.txt"

#: Texts that take every way through ``split_and_encode``: words cut for the window (a Chinese run,
#: a long hashtag), words the normaliser erases (soft hyphens: read as [UNK]), truncation.
MESSY = [
    "RT @imm_ai : Alice Smith visits Paris with the Lakers today ! #warmup http://t.co/x :)",
    "東京都庁" * 60 + " in Tokyo",
    "#" + "longhashtag" * 40 + " then words",
    "\u00ad\u00ad before words",
    "words then \u00ad and more \u00ad",
    "Alice Smith visits Paris " * 40,
    "." * 300,
    "a \u200b b e\u0301 🙂🙂 CAPS MiXeD 2017 10,000 B2B",
]


def texts() -> list[str]:
    tweets = [" ".join(e.words) for e in read_twitter_conll(VALID_TWEETS)] if VALID_TWEETS.is_file() else []
    return MESSY + tweets[:600]


@pytest.mark.parametrize("max_seq_len", [128, 12])
def test_split_and_encode_is_split_long_words_then_encode(max_seq_len):
    text = Preprocessor(
        PreprocessingConfig(max_seq_len=max_seq_len), load_tokenizer(minilm_path() / "tokenizer.json")
    ).text
    limit = text.budget + 1
    cut = erased = 0
    for sample in texts():
        words = split_words(sample)[: limit + 1]
        expected_words = text.split_long_words(words)
        expected = text.encode([w for w, _, _ in expected_words[:limit]])
        got_words, got = text.split_and_encode(words, limit)
        assert got_words == expected_words, sample
        for field in ("input_ids", "word_index", "word_shape"):
            assert getattr(got, field).tolist() == getattr(expected, field).tolist(), (sample, field)
        assert got.truncated == expected.truncated and got.marker_index is None
        cut += len(expected_words) > len(words)
        erased += "\u00ad" in sample
    assert cut >= 2 and erased >= 2  # the ways around the one pass were taken too


def test_the_shape_of_an_ascii_word_is_its_letter_by_letter_shape():
    words = {w for sample in texts() for w, _, _ in split_words(sample)}
    words |= {"".join(letters) for n in range(1, 5) for letters in itertools.product("aZbY", repeat=n)}
    ascii_words = [w for w in words if w.isascii() and w.isalpha()]
    assert len(ascii_words) > 300
    for word in ascii_words:
        assert word_shape(word) == _shape_by_letter(word), word


async def _answers(bundles, calls, **settings):
    """The answers (as JSON) of ``calls`` made one by one on a fresh engine, and its ``prepared_here``."""
    engine = Engine(make_settings(bundles, warmup=False, **settings))
    async with engine:
        answers = []
        for method, args in calls:
            answers.append((await getattr(engine, method)(*args)).to_json())
        return answers, engine.prepared_here


def test_a_lone_short_call_is_prepared_on_the_event_loop_with_the_answer_of_the_pool(bundles, monkeypatch):
    picture = jpeg_bytes()
    head, tail = (0, 5), (13, 18)
    calls = [("ner", (sample,)) for sample in MESSY] + [
        ("extract", ("Alice Smith visits Paris today",)),
        ("re", ("Alice visits Paris today", head, tail)),
        ("ner", ("Alice Smith visits Paris", picture)),  # a picture: the pool
        ("ner", ("word " * 300,)),  # past INLINE_PREPARE_MAX_CHARS: the pool
    ]
    long_texts = sum(len(sample) > engine_module.INLINE_PREPARE_MAX_CHARS for sample in MESSY)
    here, prepared_here = asyncio.run(_answers(bundles, calls))
    monkeypatch.setattr(engine_module, "INLINE_PREPARE_MAX_CHARS", 0)
    pooled, none_here = asyncio.run(_answers(bundles, calls))
    assert here == pooled
    assert prepared_here == len(MESSY) - long_texts + 2 and none_here == 0


def test_calls_with_company_are_prepared_in_the_pool(bundles):
    async def scenario() -> int:
        engine = Engine(make_settings(bundles, re_bundle=None, warmup=False))
        async with engine:
            answers = await asyncio.gather(*(engine.ner(f"alice {n} in paris") for n in range(8)))
            assert len(answers) == 8
            return engine.prepared_here

    assert asyncio.run(scenario()) == 1  # the first one alone: the others find it queued


@pytest.mark.parametrize("inline_limit", [0, 300], ids=["pool", "here"])
def test_an_admitted_call_whose_deadline_passed_is_dropped_at_preprocessing_either_way(
    bundles, monkeypatch, inline_limit
):
    monkeypatch.setattr(engine_module, "INLINE_PREPARE_MAX_CHARS", inline_limit)

    async def scenario() -> tuple[float, int]:
        engine = Engine(make_settings(bundles, re_bundle=None, warmup=False))
        async with engine:
            # Admitted at its head (as the HTTP app admits), its deadline passes before its body is read.
            deadline = time.monotonic() + 0.05
            admission = engine.admit(["ner"], deadline)
            await asyncio.sleep(0.1)
            with pytest.raises(DeadlineExceeded, match="while it was preprocessed"):
                await engine.ner("alice in paris", deadline=deadline, admission=admission)
            exposition = engine.metrics.exposition().decode()
            dropped = metric_value(exposition, "imm_dropped_total", model="ner", reason="deadline")
            return dropped, engine.prepared_here

    assert asyncio.run(scenario()) == (1, 0)


def test_the_sync_hop_returns_raises_and_cancels_as_run_coroutine_threadsafe():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def answer(value):
        await asyncio.sleep(0)
        if isinstance(value, BaseException):
            raise value
        return value

    try:
        for way in (
            _run_on,
            lambda loop, coroutine: asyncio.run_coroutine_threadsafe(coroutine, loop).result(),
        ):
            assert way(loop, answer(42)) == 42
            with pytest.raises(ValueError, match="bad"):
                way(loop, answer(ValueError("bad")))
            with pytest.raises(concurrent.futures.CancelledError):
                way(loop, answer(asyncio.CancelledError()))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
