"""Word shapes: the casing an uncased backbone cannot see, as a feature of each word (NER).

The classes, their place in the batch, and a model that reads them through training, export and
both serving runtimes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.runtimes import OnnxRuntime
from engine.runtimes.pytorch import TorchRuntime
from export import export_bundle, load_bundle
from export.bundle import session_options
from model.checkpoint import create_model, save_checkpoint
from model.preprocessing import WORD_SHAPES, Preprocessor, load_tokenizer, word_shape
from tests.conftest import NER_LABELS


@pytest.mark.parametrize(
    ("word", "shape"),
    [
        ("apple", "lower"), ("Apple", "title"), ("APPLE", "upper"), ("iPhone", "mixed"), ("McDonald", "mixed"),
        ("I", "title"), ("2019", "digits"), ("10,000", "digits"), ("B2B", "upper"), ("!", "other"),
        ("😂", "other"), ("@NBA", "mention"), ("#ElClasico", "hashtag"), ("http://t.co/x", "url"),
        ("can't", "lower"), ("José", "title"), ("東京", "lower"), ("#", "other"), ("@", "other"),
    ],
)  # fmt: skip
def test_word_shape_classes(word, shape):
    assert WORD_SHAPES[word_shape(word)] == shape


def test_collate_carries_the_shapes_of_the_words_that_fit(tiny_backbone):
    _, preprocessor = create_model("ner", NER_LABELS, tiny_backbone)
    texts = [preprocessor.text.encode(words) for words in (["Alice", "in", "PARIS"], ["@bob", "iPhone"])]
    batch = preprocessor.collate(texts, [None, None])
    shapes = [[WORD_SHAPES[i] for i in row] for row in batch["word_shape"].tolist()]
    assert shapes == [["title", "lower", "upper"], ["mention", "mixed", "pad"]]


@pytest.fixture(scope="module")
def shaped_checkpoint(tmp_path_factory, tiny_backbone):
    """A NER model reading word shapes, trained a few steps so its shape embeddings matter."""
    from tests.conftest import synthetic_ner_examples

    torch.manual_seed(0)
    model, preprocessor = create_model("ner", NER_LABELS, tiny_backbone, word_shape_size=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    examples = synthetic_ner_examples(64, seed=5)
    for start in range(0, 64, 8):
        chunk = examples[start : start + 8]
        # Capitalised names: the casing is the cue.
        words = [[w.capitalize() if t != "O" else w for w, t in zip(e.words, e.tags)] for e in chunk]
        batch = {k: torch.from_numpy(v) for k, v in preprocessor.collate(
            [preprocessor.text.encode(w) for w in words], [None] * len(chunk)
        ).items()}  # fmt: skip
        labels = torch.zeros(batch["word_index"].shape, dtype=torch.long)
        for row, example in enumerate(chunk):
            labels[row, : len(example.tags)] = torch.tensor([NER_LABELS.index(t) for t in example.tags])
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("shaped") / "ner"
    return save_checkpoint(directory, model.eval(), preprocessor), model.eval(), preprocessor


def test_the_shapes_change_the_emissions(shaped_checkpoint):
    _, model, preprocessor = shaped_checkpoint
    upper = preprocessor.collate([preprocessor.text.encode(["alice", "in", "paris"])], [None])
    lower = dict(upper, word_shape=np.ones_like(upper["word_shape"]))  # the same words, all "lower"
    upper["word_shape"] = np.full_like(upper["word_shape"], WORD_SHAPES.index("title"))
    with torch.no_grad():
        a = model(**{k: torch.from_numpy(v) for k, v in upper.items()}).logits
        b = model(**{k: torch.from_numpy(v) for k, v in lower.items()}).logits
    assert not torch.allclose(a, b)


def test_a_shaped_model_exports_and_serves_the_same_on_both_runtimes(shaped_checkpoint, tmp_path):
    checkpoint, model, _ = shaped_checkpoint
    bundle = load_bundle(export_bundle(checkpoint, tmp_path / "bundle", "fp32", log=lambda _: None))
    assert "word_shape" in bundle.input_names
    assert "head.word_shapes.weight" in bundle.manifest["weights"]
    preprocessor = Preprocessor(bundle.preprocessing, load_tokenizer(bundle.tokenizer_path))
    onnx = OnnxRuntime(bundle, preprocessor, ["CPUExecutionProvider"], session_options(1))
    torch_runtime = TorchRuntime(bundle, preprocessor, device="cpu", bucketed=True)
    sentences = [
        ["Alice", "Smith", "in", "Paris"],
        ["bob", "at", "the", "LAKERS", "game"],
        ["@carol", "Tokyo"],
    ]
    texts = [preprocessor.text.encode(words) for words in sentences]
    ours, theirs = torch_runtime.infer(texts, [None] * 3), onnx.infer(texts, [None] * 3)
    assert [t.tolist() for t in ours.tags] == [t.tolist() for t in theirs.tags]
    batch = preprocessor.collate(texts, [None] * 3)
    with torch.no_grad():
        expected = model.predict(**{k: torch.from_numpy(v) for k, v in batch.items()})
    assert [[bundle.labels[i] for i in t] for t in theirs.tags] == expected
