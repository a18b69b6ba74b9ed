"""The default bundles in weights/: answers that do not depend on the batch, and the same answers on
both runtimes.

On the valid tweets of the datasets where they are at hand (``../shared/data`` or
``$IMM_DATA_DIR``, as tests/test_words.py; never the test splits), else on invented tweets: the
labels of every tweet are identical at batch sizes 1, 16 and 64 (int8 bundles scale each row's
activations on their own: docs/export.md), and the PyTorch runtime on the CPU gives the entities
and relations of ONNX Runtime within the stated tolerance: it runs an int8 bundle's int8 weights
with float activations (fp16 on a GPU), ONNX Runtime with int8 activations, so a few answers
differ (98 of 100 tweets and of 100 pairs identical here): at least 97 % identical answers, and
99 % of the words' tags.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engine.runtimes import NEROutput, OnnxRuntime
from export import load_bundle
from export.bundle import session_options
from model.data import read_mnre, read_twitter_conll
from model.preprocessing import Preprocessor, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"
DATA_DIR = Path(os.environ.get("IMM_DATA_DIR", ROOT.parent / "shared" / "data"))
LIMIT = 100  # tweets (pairs) per dataset
RUNTIMES_SAME_ANSWERS = 0.97  # whole answers (a tweet's every tag, a pair's relation)
RUNTIMES_SAME_WORDS = 0.99  # NER: single words' tags

INVENTED = [
    "RT @NBA : LeBron James scores 40 as the Lakers beat the Celtics in Boston #NBAFinals",
    "Great morning run along the Thames in London with @sarah_k #marathon",
    "Obama 's speech in Chicago tonight was amazing ! http://t.co/xyz123",
    "Just landed in Tokyo can't wait to see the Giants play tomorrow",
    "Apple unveils the new iPhone at its Cupertino headquarters ; Tim Cook on stage",
    "Messi and Neymar train with Barcelona ahead of Real Madrid clash #ElClasico",
    "Taylor Swift announces world tour dates for Paris , Berlin and New York :)",
    "Watching the Yankees vs Red Sox at Fenway with my dad #MLB",
]


def bundle_or_skip(task: str):
    bundle = load_bundle(WEIGHTS / task)
    if "weights" not in bundle.manifest:
        pytest.skip(f"weights/{task} predates the weights table: re-export it (make weights)")
    return bundle


def ner_words() -> list[list[str]]:
    path = DATA_DIR / "twitter2017" / "valid.txt"
    if not path.exists():
        return [tweet.split() for tweet in INVENTED] * 12
    return [list(example.words) for example in read_twitter_conll(path)[:LIMIT]]


def re_examples() -> list[tuple[list[str], tuple[int, int], tuple[int, int]]]:
    path = DATA_DIR / "mnre" / "valid.txt"
    if not path.exists():
        words = INVENTED[4].split()
        return [(words, (0, 1), (10, 12)), (words, (10, 12), (0, 1))] * 32
    return [(list(e.words), e.head, e.tail) for e in read_mnre(path)[:LIMIT]]


def preprocessor_of(bundle) -> Preprocessor:
    return Preprocessor(bundle.preprocessing, load_tokenizer(bundle.tokenizer_path))


def in_batches(runtime, texts, size: int) -> list:
    answers: list = []
    for start in range(0, len(texts), size):
        chunk = texts[start : start + size]
        output = runtime.infer(chunk, [None] * len(chunk))
        answers += [tags.tolist() for tags in output.tags] if isinstance(output, NEROutput) else list(output)
    return answers


def test_int8_ner_labels_do_not_depend_on_the_batch():
    bundle = bundle_or_skip("ner")
    preprocessor = preprocessor_of(bundle)
    runtime = OnnxRuntime(bundle, preprocessor, ["CPUExecutionProvider"], session_options(1))
    texts = [preprocessor.text.encode(words) for words in ner_words()]
    alone, sixteen, sixty_four = (in_batches(runtime, texts, size) for size in (1, 16, 64))
    assert alone == sixteen == sixty_four


def test_int8_re_labels_do_not_depend_on_the_batch():
    bundle = bundle_or_skip("re")
    preprocessor = preprocessor_of(bundle)
    runtime = OnnxRuntime(bundle, preprocessor, ["CPUExecutionProvider"], session_options(1))
    texts = [preprocessor.text.encode_relation(w, h, t) for w, h, t in re_examples()]
    labels = [np.argmax(in_batches(runtime, texts, size), axis=1).tolist() for size in (1, 16, 64)]
    assert labels[0] == labels[1] == labels[2]


@pytest.mark.parametrize("task", ["ner", "re"])
def test_the_torch_runtime_answers_like_onnx_runtime_on_the_default_bundles(task):
    from engine.runtimes.pytorch import TorchRuntime

    bundle = bundle_or_skip(task)
    split = DATA_DIR / ("twitter2017" if task == "ner" else "mnre") / "valid.txt"
    if not split.exists():
        # The tolerance is a share of real tweets: a handful of invented ones repeated cannot test it.
        pytest.skip(f"{split} not available: the stated tolerance is measured on the valid tweets")
    preprocessor = preprocessor_of(bundle)
    onnx = OnnxRuntime(bundle, preprocessor, ["CPUExecutionProvider"], session_options(1))
    torch_runtime = TorchRuntime(bundle, preprocessor, device="cpu", bucketed=True)
    if task == "ner":
        texts = [preprocessor.text.encode(words) for words in ner_words()]
    else:
        texts = [preprocessor.text.encode_relation(w, h, t) for w, h, t in re_examples()]
    ours, theirs = in_batches(torch_runtime, texts, 16), in_batches(onnx, texts, 16)
    if task == "re":
        ours, theirs = np.argmax(ours, axis=1).tolist(), np.argmax(theirs, axis=1).tolist()
    same = sum(a == b for a, b in zip(ours, theirs)) / len(texts)
    assert same >= RUNTIMES_SAME_ANSWERS, f"{same:.2%} identical answers of {len(texts)}"
    if task == "ner":
        words = [(x, y) for a, b in zip(ours, theirs) for x, y in zip(a, b)]
        same_words = sum(x == y for x, y in words) / len(words)
        assert same_words >= RUNTIMES_SAME_WORDS, f"{same_words:.2%} identical tags of {len(words)} words"
