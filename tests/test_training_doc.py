"""docs/training.md's commands, run as written (issue 16): the blocks marked ``<!-- doc-test: NAME -->``.

The downloads are made up: synthetic tweets and pictures laid out as the upstream repositories
and archives unpack (``downloads/``), then the document's own blocks arrange them, save the
models, train, evaluate, export and serve. The only changes to the commands are the ones in
``SUBSTITUTIONS`` (each must still be found in the document): the hub's model names become the
tiny random BERT and CLIP of conftest, and the GPU run becomes a 1-epoch CPU one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx

from model.checkpoint import visual_training
from model.train import DEFAULT_IMAGE_DROPOUT
from tests.conftest import jpeg_bytes, synthetic_ner_examples, synthetic_re_examples
from tests.test_server import free_port, wait_ready
from tests.test_train import write_conll, write_mnre

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training.md"
BLOCK = re.compile(
    r"<!-- doc-test: (?P<name>[\w-]+) -->\n```(?P<language>\w+)\n(?P<body>.*?)\n```", re.DOTALL
)

# (block, text in the document, what the test runs instead)
SUBSTITUTIONS = [
    ("models", '"bert-base-uncased"', "{tiny_backbone!r}"),
    ("models", '"openai/clip-vit-base-patch32"', "{tiny_clip!r}"),
    ("train", "--epochs 10", "--epochs 1"),
    ("train", "--device cuda", "--device cpu"),
    ("train", "--num-workers 4", "--num-workers 0"),
    ("evaluate", "--device cuda", "--device cpu"),
]


def doc_blocks() -> dict[str, tuple[str, str]]:
    return {m["name"]: (m["language"], m["body"]) for m in BLOCK.finditer(DOC.read_text(encoding="utf-8"))}


def make_downloads(root: Path) -> dict[str, int]:
    """Tweets and pictures as UMT's repository, its picture archive, MNRE's repository and its
    picture archive unpack into ``downloads/``; returns the number of examples per file."""
    counts = {}
    for year, seed in ((2015, 0), (2017, 1)):
        text = root / "UMT" / "data" / f"twitter{year}"
        pictures = root / "IJCAI2019_data" / f"twitter{year}_images"
        text.mkdir(parents=True)
        pictures.mkdir(parents=True)
        for split, size in (("train", 16), ("valid", 8), ("test", 8)):
            examples = synthetic_ner_examples(size, seed=seed * 10 + len(split))
            examples = [
                e.__class__(e.words, e.tags, f"{year}_{split}_{n}.jpg") for n, e in enumerate(examples)
            ]
            write_conll(text / f"{split}.txt", examples)
            for n, example in enumerate(examples):
                (pictures / example.image_id).write_bytes(jpeg_bytes(width=64, height=48, seed=n))
            counts[f"twitter{year}/{split}"] = size
    text = root / "MNRE" / "mnre_txt"
    text.mkdir(parents=True)
    for split, file_name, size in (
        ("train", "mnre_train.txt", 16),
        ("val", "mnre_val .txt", 8),
        ("test", "mnre_test.txt", 8),
    ):
        pictures = root / "mnre_image" / "img_org" / split
        pictures.mkdir(parents=True)
        examples = synthetic_re_examples(size, seed=len(split))
        examples = [
            e.__class__(e.words, e.head, e.tail, e.relation, f"twitter_stream_{split}_{n}.jpg")
            for n, e in enumerate(examples)
        ]
        write_mnre(text / file_name, examples)
        for n, example in enumerate(examples):
            (pictures / example.image_id).write_bytes(jpeg_bytes(width=64, height=48, seed=100 + n))
        counts[f"mnre/{split}"] = size
    return counts


def substituted(blocks: dict[str, tuple[str, str]], **values: str) -> dict[str, str]:
    bodies = {name: body for name, (_, body) in blocks.items()}
    for name, found, replacement in SUBSTITUTIONS:
        assert found in bodies[name], f"docs/training.md's {name!r} block no longer has {found!r}"
        bodies[name] = bodies[name].replace(found, replacement.format(**values))
    return bodies


def run_block(language: str, body: str, cwd: Path, env: dict[str, str]) -> str:
    command = (
        [sys.executable, "-c", body] if language == "python" else ["bash", "-euo", "pipefail", "-c", body]
    )
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{language} block failed:\n{body}\n{result.stderr[-3000:]}"
    return result.stdout


def json_objects(text: str) -> list[dict]:
    """The JSON objects printed one after another (model.evaluate prints one, indented)."""
    decoder, objects, position = json.JSONDecoder(), [], 0
    while (start := text.find("{", position)) >= 0:
        value, position = decoder.raw_decode(text, start)
        objects.append(value)
    return objects


def test_the_training_document_runs_as_written(tmp_path, tiny_backbone, tiny_clip):
    blocks = doc_blocks()
    assert list(blocks) == ["layout", "models", "train", "evaluate", "export", "serve"]
    counts = make_downloads(tmp_path / "downloads")
    bodies = substituted(blocks, tiny_backbone=str(tiny_backbone), tiny_clip=str(tiny_clip))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMM_")}
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),  # `python` is this one
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )

    for name in ("layout", "models", "train"):
        run_block(blocks[name][0], bodies[name], tmp_path, env)
    for run, data in (("ner2015", "twitter2015"), ("ner2017", "twitter2017"), ("mnre", "mnre")):
        record = visual_training(tmp_path / "runs" / run)  # every training picture found, most fed
        assert record["examples_with_picture"] == record["training_examples"] == counts[f"{data}/train"]
        # the default modality dropout (--images given, no --image-dropout) left some out
        assert record["image_dropout"] == DEFAULT_IMAGE_DROPOUT, record
        assert 0 < record["pictures_seen"] < record["training_examples"], record
        assert record["sw"] is True, record

    scores = json_objects(run_block("bash", bodies["evaluate"], tmp_path, env))
    assert [s["examples"] for s in scores] == [
        counts["twitter2015/test"],
        counts["twitter2017/test"],
        counts["mnre/test"],
    ]
    assert all(s["missing_images"] == 0 and 0 <= s["f1"] <= 1 for s in scores), scores

    (bundle_scores,) = json_objects(run_block("bash", bodies["export"], tmp_path, env))
    assert bundle_scores["missing_images"] == 0 and bundle_scores["examples"] == counts["twitter2017/test"]
    for bundle in ("ner2017", "mnre"):
        manifest = json.loads((tmp_path / "bundles" / bundle / "manifest.json").read_text())
        assert manifest["visual_stream"] is True

    serve(bodies["serve"], tmp_path, env)


def serve(body: str, cwd: Path, env: dict[str, str]) -> None:
    """The serve line (``VAR=value ... python -m service``), on a free port, until it answered."""
    *assignments, python, flag, module = shlex.split(body.strip())
    assert (python, flag, module) == ("python", "-m", "service") and assignments
    port = free_port()
    server_env = {**env, **dict(a.split("=", 1) for a in assignments)}
    server_env.update(IMM_PORT=str(port), IMM_INTRA_OP_THREADS="1", IMM_PREPROCESS_THREADS="1")
    server_env["PROMETHEUS_MULTIPROC_DIR"] = str(cwd / "metrics")
    log = open(cwd / "server.log", "w+")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=cwd, env=server_env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, lambda: (cwd / "server.log").read_text()[-3000:])
        text = "alice smith flew to paris with the lakers"
        ner = httpx.post(
            f"{url}/ner", data={"text": text}, files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}
        )
        assert ner.status_code == 200 and ner.json()["image_used"] is True, ner.text
        relation = httpx.post(
            f"{url}/re",
            data={"text": text, "head_start": 0, "head_end": 5, "tail_start": 20, "tail_end": 25},
            files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")},
        )
        assert relation.status_code == 200 and relation.json()["image_used"] is True, relation.text
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
