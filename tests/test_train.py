"""The training and evaluation commands, end to end on tiny models and generated data."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model.checkpoint import (
    describe_visual_training,
    has_checkpoint,
    load_checkpoint,
    read_json,
    resolve_checkpoint,
    visual_training,
)
from model.evaluate import main as evaluate_main
from model.run_directory import live_generation
from model.train import UsageError, build_model, build_parser, parameter_groups, parse_args, train
from model.train import main as train_main
from tests.conftest import FIRST_NAMES, synthetic_ner_examples, synthetic_re_examples

FAST = [
    "--lr",
    "3e-3",
    "--new-module-lr",
    "3e-3",
    "--head-lr",
    "3e-2",
    "--warmup-ratio",
    "0",
    "--batch-size",
    "8",
]


def write_conll(path: Path, examples) -> Path:
    lines = []
    for example in examples:
        lines.append(f"IMGID:{example.image_id.removesuffix('.jpg')}")
        lines += [f"{word}\t{tag.replace('MISC', 'OTHER')}" for word, tag in zip(example.words, example.tags)]
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_mnre(path: Path, examples) -> Path:
    rows = []
    for e in examples:
        record = {
            "token": list(e.words),
            "h": {"name": " ".join(e.words[slice(*e.head)]), "pos": list(e.head)},
            "t": {"name": " ".join(e.words[slice(*e.tail)]), "pos": list(e.tail)},
            "img_id": e.image_id,
            "relation": e.relation,
        }
        rows.append(repr(record))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ner_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ner_data")
    examples = synthetic_ner_examples(48, seed=3)
    return write_conll(directory / "train.txt", examples), write_conll(directory / "dev.txt", examples[:24])


def run_train(*argv) -> int:
    return train_main([str(a) for a in argv])


def state_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The committed resume state (weights and optimizer) of a run."""
    return load_file(str(live_generation(run_dir) / "training_state" / "state.safetensors"))


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def assert_resume_matches_straight(common: list[str], tmp_path: Path) -> Path:
    """Trains ``common`` straight through, and again killed after its first epoch then resumed: the
    resumed run ends with the same weights and optimizer state. Returns the resumed run's directory."""
    train(parse_args([*common, "--out", str(tmp_path / "straight")]))

    class Killed(Exception):
        pass

    def kill_after_first_epoch(epoch, record):
        if epoch == 1:
            raise Killed

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Killed):
        train(parse_args([*common, "--out", str(interrupted)]), on_epoch_end=kill_after_first_epoch)
    assert read_json(interrupted, "scores.json")["epoch"] == 1
    train(parse_args([*common, "--out", str(interrupted), "--resume"]))
    assert_same_tensors(state_tensors(interrupted), state_tensors(tmp_path / "straight"))
    return interrupted


def test_ner_overfits_to_f1_one_and_evaluate_prints_json(tmp_path, ner_files, tiny_backbone, capsys):
    train_file, dev_file = ner_files
    out = tmp_path / "ner"
    code = run_train(
        "--task", "ner", "--train", train_file, "--dev", dev_file, "--out", out, "--backbone", tiny_backbone,
        "--epochs", "12", *FAST,
    )  # fmt: skip
    assert code == 0
    scores = read_json(out, "scores.json")
    assert scores["dev_f1"] == 1.0
    record = visual_training(out)  # trained without --images
    assert (record["trained"], record["pictures_seen"], record["source"]) == (False, 0, "recorded")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == list(range(1, 13))
    assert (out / "training_curves.png").stat().st_size > 1000
    capsys.readouterr()
    predictions = tmp_path / "predictions.jsonl"
    assert (
        evaluate_main(["--checkpoint", str(out), "--data", str(dev_file), "--predictions", str(predictions)])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["f1"] == 1.0 and result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["examples"] == 24 and result["missing_images"] == 24
    assert set(result["per_type"]) <= {"PER", "LOC", "ORG", "MISC"} and result["per_type"]["PER"]["f1"] == 1.0
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == 24 and all(r["gold"] == r["pred"] for r in records)


@pytest.mark.parametrize("pooling", ["cls", "entity_start"])
def test_re_overfits_to_f1_one(tmp_path, tiny_backbone, capsys, pooling):
    examples = synthetic_re_examples(48, seed=4)
    train_file = write_mnre(tmp_path / "train.txt", examples)
    out = tmp_path / "re"
    assert run_train(
        "--task", "re", "--train", train_file, "--dev", train_file, "--out", out, "--backbone", tiny_backbone,
        "--epochs", "25", "--re-pooling", pooling, *FAST,
    ) == 0  # fmt: skip
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(out), "--data", str(train_file)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["f1"] == 1.0
    assert "/per/loc/place_of_residence" in result["per_relation"]


def colour_examples(directory: Path, count: int, seed: int):
    """Relations that only the picture tells: the same kind of text, red image -> peer, blue -> couple."""
    from model.data import REExample

    rng = np.random.default_rng(seed)
    examples = []
    for number in range(count):
        red = bool(number % 2)
        name = f"{'red' if red else 'blue'}_{seed}_{number}.jpg"
        base = np.array([220, 30, 30] if red else [30, 30, 220], dtype=np.float64)
        pixels = np.clip(base + rng.normal(0, 25, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(directory / name, quality=90)
        head, tail = rng.choice(FIRST_NAMES, size=2, replace=False)
        words = (str(head), "and", str(tail), "today")
        relation = "/per/per/peer" if red else "/per/per/couple"
        examples.append(REExample(words=words, head=(0, 1), tail=(2, 3), relation=relation, image_id=name))
    return examples


def test_the_image_path_learns(tmp_path, tiny_backbone, capsys):
    images = tmp_path / "images"
    images.mkdir()
    train_file = write_mnre(tmp_path / "train.txt", colour_examples(images, 64, seed=0))
    dev_file = write_mnre(tmp_path / "dev.txt", colour_examples(images, 32, seed=1))
    out = tmp_path / "re"
    assert run_train(
        "--task", "re", "--train", train_file, "--dev", dev_file, "--out", out, "--backbone", tiny_backbone,
        "--images", images, "--epochs", "10", "--image-dropout", "0", *FAST,
    ) == 0  # fmt: skip
    capsys.readouterr()
    scores = {}
    for mode in (["--images", str(images)], ["--no-images"]):
        assert evaluate_main(["--checkpoint", str(out), "--data", str(dev_file), *mode]) == 0
        scores[mode[0]] = json.loads(capsys.readouterr().out)
    with_images, without = scores["--images"]["f1"], scores["--no-images"]["f1"]
    assert scores["--images"]["missing_images"] == 0 and scores["--no-images"]["missing_images"] == 32
    assert with_images >= 0.9, scores
    assert with_images - without >= 0.3, scores
    record = visual_training(out)
    epoch = read_json(out, "scores.json")["epoch"]
    assert record["trained"] is True and record["pictures_seen"] == 64 * epoch, record
    assert (record["examples_with_picture"], record["training_examples"]) == (64, 64)
    assert (record["ia"], record["attention_mode"], record["sw"]) == (True, "separate", False)
    assert record["sw_reason"] == "off: no --clip teacher given"


def test_the_default_recipe_learns_the_visual_path(tmp_path, capsys):
    """Issue 16: the default learning rates learn what only the picture tells, on a pretrained
    backbone (MiniLM's first 2 layers, 384 wide like the default models), in 120 steps. Before IA's
    key scale, the inserted slots' gates died at these rates and picture-typed entities stayed at
    chance (docs/training.md has the full table: bench/multimodal_synthetic.py stability)."""
    from bench.multimodal_synthetic import cut_backbone, make_set, origin_scores
    from model.data import read_twitter_conll
    from model.data.images import ImageStore
    from model.evaluate import evaluate

    data = make_set(tmp_path / "set", train=480, dev=60, seed=5)
    out = tmp_path / "ner"
    assert run_train(
        "--task", "ner", "--train", data["train"], "--dev", data["dev"], "--images", data["images"],
        "--backbone", cut_backbone(tmp_path / "minilm-l2"), "--out", out,
        "--epochs", "2", "--batch-size", "8", "--max-seq-len", "24", "--seed", "1",
    ) == 0  # fmt: skip
    capsys.readouterr()
    model, preprocessor = load_checkpoint(out)
    dev = read_twitter_conll(data["dev"])
    scores = {}
    for side, directory in (("with", data["images"]), ("without", None)):
        result, predictions = evaluate(model, preprocessor, dev, ImageStore(directory, preprocessor.image))
        scores[side] = {"f1": result["f1"], **origin_scores(dev, predictions)}
    assert scores["with"]["picture_typed"]["f1"] >= 0.9 and scores["with"]["f1"] >= 0.95, scores
    assert scores["without"]["picture_typed"]["f1"] <= 0.6, scores  # the type came from the picture


def test_resume_after_interruption_gives_the_same_weights(tmp_path, ner_files, tiny_backbone):
    train_file, dev_file = ner_files
    common = ["--task", "ner", "--train", str(train_file), "--dev", str(dev_file), "--backbone", str(tiny_backbone),
              "--epochs", "3", *FAST]  # fmt: skip
    interrupted = assert_resume_matches_straight(common, tmp_path)
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_two_process_ddp_run_completes(tmp_path, ner_files, tiny_backbone):
    train_file, dev_file = ner_files
    out = tmp_path / "ddp"
    with socket.socket() as probe:  # torchrun's own port 0 handling can hang: pick a free port here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "-m", "model.train", "--task", "ner", "--train", str(train_file), "--dev", str(dev_file),
        "--out", str(out), "--backbone", str(tiny_backbone), "--epochs", "2", *FAST,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert has_checkpoint(out)
    assert result.stdout.count('"best_epoch"') == 1  # only rank 0 reports


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, d: a.__setitem__(a.index("--train") + 1, str(d / "missing.txt")), "no such file"),
        (
            lambda a, d: a.__setitem__(a.index("--train") + 1, str(_write(d / "empty.txt", ""))),
            "holds no examples",
        ),
        (
            lambda a, d: a.__setitem__(
                a.index("--train") + 1, str(_write(d / "bad.txt", "IMGID:1\nword\tB-FOO\n"))
            ),
            "bad.txt:2",
        ),
        (
            lambda a, d: a.extend(["--images", str(_mkdir(d / "no_images"))]),
            "none of the training examples' images",
        ),
        (lambda a, d: a.extend(["--clip", str(d / "nowhere")]), "--clip"),
        (lambda a, d: a.append("--resume"), "no interrupted run"),
        (
            lambda a, d: a.extend(["--image-dropout", "0.5"]),
            "--image-dropout drops pictures: it needs --images",
        ),
        (
            lambda a, d: a.extend(["--images", str(d), "--image-dropout", "1"]),
            "--image-dropout must be at least 0 and below 1",
        ),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, ner_files, tiny_backbone, capsys, change, message):
    train_file, dev_file = ner_files
    argv = ["--task", "ner", "--train", str(train_file), "--dev", str(dev_file), "--out", str(tmp_path / "out"),
            "--backbone", str(tiny_backbone), "--epochs", "1"]  # fmt: skip
    change(argv, tmp_path)
    assert train_main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and message in error[-1]
    assert "Traceback" not in "\n".join(error)
    assert not has_checkpoint(tmp_path / "out")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    (path / "unrelated.jpg").write_bytes(b"")
    return path


def test_average_last_scores_the_mean_of_the_last_epochs(tmp_path, ner_files, tiny_backbone):
    train_file, dev_file = ner_files
    out = tmp_path / "averaged"
    train(parse_args([
        "--task", "ner", "--train", str(train_file), "--dev", str(dev_file), "--backbone", str(tiny_backbone),
        "--epochs", "3", "--average-last", "2", "--out", str(out), *FAST,
    ]))  # fmt: skip
    weights = live_generation(out) / "epoch_weights"
    kept = sorted(p.name for p in weights.iterdir())
    assert kept == ["epoch-002.safetensors", "epoch-003.safetensors"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows[:3]] == [1, 2, 3]
    averaged = rows[3]
    assert averaged["epochs"] == [2, 3] and 0 <= averaged["dev_f1"] <= 1
    first, second = (load_file(str(weights / name)) for name in kept)
    best_single = max(row["dev_f1"] for row in rows[:3])
    checkpoint = load_file(str(resolve_checkpoint(out) / "model.safetensors"))
    name = "head.classifier.weight"
    if averaged["kept"]:
        assert averaged["dev_f1"] > best_single
        assert torch.allclose(checkpoint[name], (first[name] + second[name]) / 2, atol=1e-6)
    else:
        assert not torch.allclose(checkpoint[name], (first[name] + second[name]) / 2, atol=1e-6)


def test_init_from_takes_max_seq_len(tmp_path, trained_ner_checkpoint):
    """Issue 16: --init-from used to return before the --max-seq-len override."""
    argv = ["--task", "re", "--train", "x", "--dev", "y", "--out", str(tmp_path / "re"),
            "--init-from", str(trained_ner_checkpoint)]  # fmt: skip
    model, preprocessor = build_model(parse_args([*argv, "--max-seq-len", "40"]))
    assert model.config.preprocessing.max_seq_len == 40 and preprocessor.config.max_seq_len == 40
    assert len(preprocessor.text.encode(["word"] * 100).input_ids) == 40
    source, _ = load_checkpoint(trained_ner_checkpoint)
    assert source.config.preprocessing.max_seq_len == 128  # the source's config is not touched
    with pytest.raises(UsageError, match="--max-seq-len must be between 3 and the backbone's 128 positions"):
        build_model(parse_args([*argv, "--max-seq-len", "512"]))


def test_weight_decay_spares_biases_layernorms_and_the_visual_vectors(tmp_path, tiny_backbone):
    """Issue 16: the visual [CLS] and type embedding were decayed although the docstring exempted them."""
    args = parse_args(["--task", "ner", "--train", "x", "--dev", "y", "--out", str(tmp_path / "o"),
                       "--backbone", str(tiny_backbone)])  # fmt: skip
    model, _ = build_model(args)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    decayed = {
        names[id(p)]
        for group in parameter_groups(model, args)
        if group["weight_decay"] > 0
        for p in group["params"]
    }
    visual_vectors = {
        f"encoder.patch_embeddings.{name}" for name in ("cls_token", "position_embeddings", "type_embedding")
    }
    expected = {
        name
        for name in names.values()
        if name.endswith(".weight") and "LayerNorm" not in name or name == "head.crf.transitions"
    }
    assert decayed == expected
    assert not decayed & visual_vectors and "encoder.text_embeddings.word_embeddings.weight" in decayed
    assert all(
        group["weight_decay"] == args.weight_decay
        for group in parameter_groups(model, args)
        if group["weight_decay"]
    )


def test_no_ia_help_says_what_it_leaves():
    text = " ".join(build_parser().format_help().split())
    assert "text-only model" in text and "--attention-mode joint" in text


def test_visual_training_is_recorded_and_derived_for_older_checkpoints(tmp_path, trained_ner_checkpoint):
    """Issue 14: the checkpoint says whether its visual path was trained; older ones are read from
    training_args.json (``images`` None: never trained)."""
    older = Path(shutil.copytree(trained_ner_checkpoint, tmp_path / "older"))  # no record, no training args
    assert visual_training(older)["source"] == "unknown" and visual_training(older)["trained"] is True
    arguments = resolve_checkpoint(older) / "training_args.json"
    arguments.write_text(json.dumps({"images": None, "no_ia": False, "attention_mode": "separate"}))
    record = visual_training(older)
    assert (record["trained"], record["source"], record["sw"]) == (False, "training_args.json", False)
    arguments.write_text(json.dumps({"images": "pictures/", "clip": "clip/", "no_sw": False}))
    record = visual_training(older)
    assert (record["trained"], record["pictures_seen"], record["sw"]) == (True, None, True)
    common = {"use_ia": False, "attention_mode": "separate", "pictures_seen": 100}
    assert describe_visual_training({"images": "x"}, **common)["trained"] is False  # nothing reaches the text
    assert (
        describe_visual_training({"images": "x"}, **{**common, "attention_mode": "joint"})["trained"] is True
    )
    assert (
        describe_visual_training({"images": "x"}, **{**common, "use_ia": True, "pictures_seen": 0})["trained"]
        is False
    )


def test_image_dropout_is_drawn_per_seed_epoch_and_example(tmp_path, tiny_backbone):
    """Issue 14: modality dropout. Reproducible (what --resume needs), about P of the pictures,
    a new draw each epoch, and the augmented views of the kept pictures are unchanged by it."""
    from model.data.dataset import IMMDataset
    from model.data.images import ImageStore

    images = tmp_path / "images"
    images.mkdir()
    examples = colour_examples(images, 200, seed=0)
    model, preprocessor = build_model(
        parse_args(["--task", "re", "--train", "x", "--dev", "y", "--out", str(tmp_path / "o"),
                    "--backbone", str(tiny_backbone)])
    )  # fmt: skip
    store = ImageStore(images, preprocessor.image)

    def dataset(p: float, seed: int = 7) -> IMMDataset:
        return IMMDataset(
            examples, preprocessor, model.config.labels, store, with_augmented_view=True,
            augment_seed=seed, image_dropout=p,
        )  # fmt: skip

    half, again, none = dataset(0.5), dataset(0.5), dataset(0.0)
    dropped = [half.drops_picture(n) for n in range(200)]
    assert dropped == [again.drops_picture(n) for n in range(200)]
    assert 70 <= sum(dropped) <= 130 and not any(none.drops_picture(n) for n in range(200))
    half.epoch = 1
    assert dropped != [half.drops_picture(n) for n in range(200)]
    assert dropped != [dataset(0.5, seed=8).drops_picture(n) for n in range(200)]
    half.epoch = 0
    for number in range(12):
        item, plain = half[number], none[number]
        if dropped[number]:
            assert item.pixels is None and item.augmented is None
        else:
            assert np.array_equal(item.pixels, plain.pixels) and np.array_equal(
                item.augmented, plain.augmented
            )
    with pytest.raises(ValueError, match="image_dropout"):
        dataset(1.0)


def test_dropped_pictures_are_not_counted_as_seen(tmp_path, tiny_backbone, capsys):
    from model.data.dataset import IMMDataset
    from model.data.images import ImageStore

    images = tmp_path / "images"
    images.mkdir()
    examples = colour_examples(images, 40, seed=0)
    train_file = write_mnre(tmp_path / "train.txt", examples)
    out = tmp_path / "re"
    assert run_train(
        "--task", "re", "--train", train_file, "--dev", train_file, "--out", out, "--backbone", tiny_backbone,
        "--images", images, "--epochs", "2", "--image-dropout", "0.5", "--seed", "5", *FAST,
    ) == 0  # fmt: skip
    capsys.readouterr()
    model, preprocessor = load_checkpoint(out)
    counter = IMMDataset(
        examples, preprocessor, model.config.labels, ImageStore(images, preprocessor.image),
        augment_seed=5, image_dropout=0.5,
    )  # fmt: skip
    kept = []
    for epoch in range(2):
        counter.epoch = epoch
        kept.append(sum(not counter.drops_picture(n) for n in range(40)))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["train_pictures"] for row in history] == kept and 0 < kept[0] < 40
    record = visual_training(out)
    epoch = read_json(out, "scores.json")["epoch"]
    assert record["pictures_seen"] == sum(kept[:epoch]) and record["image_dropout"] == 0.5
    assert record["trained"] is True and record["examples_with_picture"] == 40
