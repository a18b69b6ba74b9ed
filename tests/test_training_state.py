"""Training state that survives any kill: every save is one atomic switch (model.run_directory).

A kill is injected before the n-th filesystem operation of a save (mkdir, link, fsync, rename,
unlink, rmdir), for every n, by raising from a patched ``os`` function: nothing after that point
runs, as after a SIGKILL (clean-up code that a real kill would skip is not relied on: the save has
none). Then the run is recovered the way a user would (``--resume`` when the run says it holds a
state, else a fresh start), and must end bit for bit where an uninterrupted run ends.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model.train
from model.checkpoint import has_checkpoint, read_json, resolve_checkpoint
from model.run_directory import GENERATIONS_DIR, POINTER_FILE, live_generation
from model.train import UsageError, check_inputs, parse_args, train
from model.training_state import (
    EPOCH_WEIGHTS_DIR,
    STATE_DIR,
    has_training_state,
    remove_stale_temporaries,
    save_generation,
)
from tests.conftest import minilm_path, synthetic_ner_examples
from tests.test_train import FAST, write_conll

OPERATIONS = ("mkdir", "link", "fsync", "replace", "rename", "unlink", "rmdir")


class Killed(BaseException):
    """The process died here (a BaseException, so that no ``except Exception`` handles it)."""


class FaultInjector:
    """Counts the filesystem operations made while active, and kills the n-th (1-based).

    ``fsync`` is counted (and can be killed) but not performed: no power is cut in these tests, so
    it would only cost time; that a save fsyncs what it must, in order, is checked on its own."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at = kill_at
        self.operations: list[tuple[str, str]] = []

    @contextmanager
    def active(self):
        originals = {name: getattr(os, name) for name in OPERATIONS}

        def wrapped(name, original):
            def operation(*args, **kwargs):
                target = str(args[0]) if args else ""
                if name == "fsync" and os.path.exists(f"/proc/self/fd/{args[0]}"):  # Linux: the file's name
                    target = os.readlink(f"/proc/self/fd/{args[0]}")
                self.operations.append((name, target))
                if len(self.operations) == self.kill_at:
                    raise Killed(f"killed before {name} {args[0] if args else ''}")
                return None if name == "fsync" else original(*args, **kwargs)

            return operation

        for name, original in originals.items():
            setattr(os, name, wrapped(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(os, name, original)


@pytest.fixture(scope="module")
def nano_backbone(tmp_path_factory) -> Path:
    """conftest's tiny BERT made 4 times narrower: each of the hundred saves below writes 6 MB, not 25."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("nano_bert")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    shutil.copy(minilm_path() / "tokenizer.json", directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def small_ner_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small_ner")
    examples = synthetic_ner_examples(16, seed=5)
    return write_conll(directory / "train.txt", examples), write_conll(directory / "dev.txt", examples[:8])


def tree(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def outcome(run_dir: Path) -> dict:
    """Everything a finished run leaves that must not depend on how often it was killed."""
    generation = live_generation(run_dir)
    checkpoint = resolve_checkpoint(run_dir)
    progress = json.loads((generation / STATE_DIR / "progress.json").read_text())["progress"]
    weights = generation / EPOCH_WEIGHTS_DIR
    return {
        "layout": [
            path.replace(f"{GENERATIONS_DIR}/{generation.name}", f"{GENERATIONS_DIR}/LIVE")
            for path in tree(run_dir)
        ],
        "state": load_file(str(generation / STATE_DIR / "state.safetensors")),
        "checkpoint": load_file(str(checkpoint / "model.safetensors")),
        "epoch_weights": {p.name: load_file(str(p)) for p in sorted(weights.iterdir())}
        if weights.is_dir()
        else {},
        "scores": read_json(run_dir, "scores.json"),
        "visual_training": read_json(run_dir, "visual_training.json"),
        "history": [(row["epoch"], row["train_loss"], row["dev_f1"]) for row in progress["history"]],
        "averaged": progress.get("averaged", {}).get("dev_f1"),
        "metrics": [
            (row["epoch"], row["dev_f1"])
            for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        ],
    }


def assert_same_outcome(actual: dict, expected: dict, context: str) -> None:
    for key in ("layout", "scores", "visual_training", "history", "averaged", "metrics"):
        assert actual[key] == expected[key], f"{context}: {key}"
    for key in ("state", "checkpoint"):
        assert actual[key].keys() == expected[key].keys(), f"{context}: {key}"
        for name, tensor in expected[key].items():
            assert torch.equal(actual[key][name], tensor), f"{context}: {key} {name}"
    assert actual["epoch_weights"].keys() == expected["epoch_weights"].keys(), context
    for file, tensors in expected["epoch_weights"].items():
        for name, tensor in tensors.items():
            assert torch.equal(actual["epoch_weights"][file][name], tensor), f"{context}: {file} {name}"


def content_hash(path: Path) -> str:
    """A file's content; for safetensors, its tensors and metadata (its JSON header's key order
    varies from one write of the same tensors to the next)."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        size = int.from_bytes(data[:8], "little")
        header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True).encode()
        data = header + data[8 + size :]
    return hashlib.sha256(data).hexdigest()


def digest(directory: Path) -> dict[str, str]:
    """Every path under ``directory`` with its content's hash ("" for a directory)."""
    return {
        str(path.relative_to(directory)): "" if path.is_dir() else content_hash(path)
        for path in directory.rglob("*")
    }


def test_a_kill_at_every_step_of_every_save_resumes_to_the_same_weights(
    tmp_path, small_ner_files, nano_backbone, monkeypatch
):
    """Saves 1 (the first: nothing live yet), 2 (replacing a live generation: a new best checkpoint
    or the live one shared, epoch weights) and 3 (checkpoint averaging) of a 2-epoch run, each
    killed before every one of its filesystem operations, and also right after its last.

    The run is taken once; before each save its directory is snapshotted (hard links: files are
    never changed in place, which this test also checks) with the save's arguments, and every
    killed save replays on a copy of that snapshot. After each kill: exactly one of ``--resume``
    and a fresh start is accepted, the checkpoint belongs to the state, and the directory, once
    swept of the save's debris as a training start sweeps it, is byte for byte the one before the
    save or the one after it. From the first kill of each of those two kinds the run is resumed
    (or restarted) to its end, and ends bit for bit where the uninterrupted run ended, debris
    gone; every other kill leaves one of those two directories, so it resumes the same way."""
    train_file, dev_file = small_ner_files
    common = ["--task", "ner", "--train", str(train_file), "--dev", str(dev_file), "--backbone", str(nano_backbone),
              "--epochs", "2", "--average-last", "2", "--max-seq-len", "64", *FAST]  # fmt: skip
    captured: list[tuple[Path, dict]] = []

    def capturing_save(run_dir, **kwargs):
        snapshot = tmp_path / f"before-save-{len(captured) + 1}"
        shutil.copytree(run_dir, snapshot, copy_function=os.link)
        captured.append((snapshot, copy.deepcopy(kwargs)))
        return save_generation(run_dir, **kwargs)

    # The plot is redrawn after every save, at ~0.3 s each: the recoveries below would spend most of
    # their time drawing it (tests/test_train.py checks it).
    monkeypatch.setattr(model.train, "plot_history", lambda history, path: None)
    straight = tmp_path / "straight"
    with monkeypatch.context() as patch:
        patch.setattr(model.train, "save_generation", capturing_save)
        train(parse_args([*common, "--out", str(straight)]))
    expected = outcome(straight)
    assert len(captured) == 3 and expected["averaged"] is not None
    assert sorted(os.listdir(straight)) == [POINTER_FILE, GENERATIONS_DIR, "metrics.jsonl"]

    def replay(snapshot: Path, arguments: dict, kill_at: int | None) -> tuple[Path, FaultInjector, bool]:
        scratch = tmp_path / "killed"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(snapshot, scratch, copy_function=os.link)
        injector = FaultInjector(kill_at)
        try:
            with injector.active():
                save_generation(scratch, **arguments)
        except Killed:
            return scratch, injector, True
        return scratch, injector, False

    steps = {}
    for number, (snapshot, arguments) in enumerate(captured, start=1):
        references = {"before": digest(snapshot), "after": digest(replay(snapshot, arguments, None)[0])}
        assert digest(snapshot) == references["before"]  # the replays changed no shared file
        resumed: set[str] = set()
        kill_at = 0
        while True:
            kill_at += 1
            scratch, injector, killed = replay(snapshot, arguments, kill_at)
            context = f"save {number} killed before operation {kill_at} {injector.operations[-1]}"
            resumable = has_training_state(scratch)
            assert resumable == has_checkpoint(scratch), context
            refused = ["--out", str(scratch)] + ([] if resumable else ["--resume"])
            with pytest.raises(
                UsageError, match="already holds a checkpoint" if resumable else "no interrupted run"
            ):
                check_inputs(parse_args([*common, *refused]))
            if resumable:  # the checkpoint comes from the same save as the state (item 10)
                generation = live_generation(scratch)
                progress = json.loads((generation / STATE_DIR / "progress.json").read_text())["progress"]
                scores = read_json(scratch, "scores.json")
                assert scores["epoch"] == progress["best"]["epoch"], context
                if scores["epoch"] == progress["epoch"]:  # the last epoch is the best: the same weights
                    weights = load_file(str(resolve_checkpoint(scratch) / "model.safetensors"))
                    state = load_file(str(generation / STATE_DIR / "state.safetensors"))
                    for name, tensor in weights.items():
                        assert torch.equal(tensor, state[f"model.{name}"]), context
            swept = tmp_path / "swept"
            shutil.rmtree(swept, ignore_errors=True)
            shutil.copytree(scratch, swept, copy_function=os.link)
            remove_stale_temporaries(swept)
            kind = next((k for k, reference in references.items() if digest(swept) == reference), None)
            assert kind is not None, (
                f"{context}: the swept directory is neither the one before nor after the save",
                sorted(digest(swept)),
            )
            if kind not in resumed:
                resumed.add(kind)
                with FaultInjector().active():  # fsync skipped: the recovery is not what is under test
                    train(parse_args([*common, "--out", str(scratch), *(["--resume"] if resumable else [])]))
                assert_same_outcome(outcome(scratch), expected, context)
            if not killed:
                break
        assert resumed == {"before", "after"}, number
        steps[number] = kill_at - 1
    assert all(count >= 15 for count in steps.values()), steps  # each save was killed at each of its steps


def tiny_generation_save(run_dir: Path, epoch: int, *, new_checkpoint: bool, kill_at: int | None = None):
    """A save of the real kind (checkpoint, state, epoch weights) for a small module whose every
    weight equals ``epoch``; returns its FaultInjector (``killed``, ``operations``)."""
    module = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        module.weight.fill_(epoch)
        module.bias.fill_(epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def write(directory: Path) -> None:
        directory.mkdir()
        save_file({"weight": module.weight.detach().clone()}, str(directory / "model.safetensors"))
        (directory / "scores.json").write_text(json.dumps({"epoch": epoch}))

    injector = FaultInjector(kill_at)
    injector.killed = False
    try:
        with injector.active():
            save_generation(
                run_dir,
                model=module,
                optimizer=optimizer,
                scheduler=scheduler,
                progress={"epoch": epoch, "best_epoch": epoch if new_checkpoint else epoch - 1},
                new_checkpoint=write if new_checkpoint else None,
                keep_epochs=2,
                new_epoch=epoch,
            )
    except Killed:
        injector.killed = True
    return injector


def committed(run_dir: Path) -> tuple[int, int, list[str]]:
    """(state epoch, checkpoint epoch, kept epoch weights) of the live generation, checked whole."""
    generation = live_generation(run_dir)
    progress = json.loads((generation / STATE_DIR / "progress.json").read_text())["progress"]
    state = load_file(str(generation / STATE_DIR / "state.safetensors"))
    assert torch.all(state["model.weight"] == progress["epoch"])
    checkpoint_epoch = read_json(run_dir, "scores.json")["epoch"]
    assert torch.all(
        load_file(str(resolve_checkpoint(run_dir) / "model.safetensors"))["weight"] == checkpoint_epoch
    )
    assert checkpoint_epoch == progress["best_epoch"]  # never epoch-2 weights with epoch-1 scores
    kept = sorted(p.name for p in (generation / EPOCH_WEIGHTS_DIR).iterdir())
    for name in kept:
        assert torch.all(load_file(str(generation / EPOCH_WEIGHTS_DIR / name))["weight"] == int(name[6:9]))
    return progress["epoch"], checkpoint_epoch, kept


def test_two_kills_in_a_row_always_leave_one_complete_state(tmp_path):
    """Issue 15, items 9-11. A save of epoch 2 (with a new best checkpoint, or sharing the live one)
    killed at every step n, then tried again to completion; and (new best) killed just before and
    just after the switch, then killed again at every step m of the next try. The live generation
    is always whole (state, checkpoint and epoch weights of one save), and the next completed save
    leaves no temporary and no older generation behind."""
    base = tmp_path / "base"
    tiny_generation_save(base, 1, new_checkpoint=True)
    cases = []
    for new_checkpoint in (True, False):
        probe = tmp_path / "probe"
        shutil.copytree(base, probe)
        operations = tiny_generation_save(probe, 2, new_checkpoint=new_checkpoint).operations
        shutil.rmtree(probe)
        switch = operations.index(("replace", str(probe / "CURRENT.tmp"))) + 1
        assert len(operations) >= 15 and switch < len(operations), operations
        cases += [(new_checkpoint, switch, first, None) for first in range(1, len(operations) + 1)]
        if new_checkpoint:
            seconds = range(1, len(operations) + 2)
            cases += [(True, switch, first, second) for first in (switch, switch + 1) for second in seconds]
    for new_checkpoint, switch, first, second in cases:
        epochs_1 = (1, 1, ["epoch-001.safetensors"])
        epochs_2 = (2, 2 if new_checkpoint else 1, ["epoch-001.safetensors", "epoch-002.safetensors"])
        context = (new_checkpoint, first, second)
        run = tmp_path / "run"
        shutil.copytree(base, run)
        assert tiny_generation_save(run, 2, new_checkpoint=new_checkpoint, kill_at=first).killed
        assert committed(run) == (epochs_1 if first <= switch else epochs_2), context
        if second is not None:
            tiny_generation_save(run, 2, new_checkpoint=new_checkpoint, kill_at=second)
        state = committed(run)
        assert state in (epochs_1, epochs_2) and has_training_state(run) and has_checkpoint(run), context
        if state == epochs_1:  # what --resume does: epoch 2 again
            assert not tiny_generation_save(run, 2, new_checkpoint=new_checkpoint).killed
        assert not tiny_generation_save(run, 3, new_checkpoint=True).killed
        assert committed(run) == (3, 3, ["epoch-002.safetensors", "epoch-003.safetensors"]), context
        assert sorted(os.listdir(run)) == [POINTER_FILE, GENERATIONS_DIR], context
        assert len(os.listdir(run / GENERATIONS_DIR)) == 1, context
        shutil.rmtree(run)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced files through /proc/self/fd")
def test_a_save_is_durable_before_it_is_switched_in(tmp_path):
    """Every file and directory of the new generation, and the pointer's staging file, are fsynced
    before the rename that switches to it; the run directory after it; only then is the previous
    generation removed. (A power cut cannot lose a save the log reported, nor switch to a generation
    whose files are not on disk.)"""
    run = tmp_path / "run"
    tiny_generation_save(run, 1, new_checkpoint=True)
    operations = tiny_generation_save(run, 2, new_checkpoint=False).operations
    generation = live_generation(run)
    switch = operations.index(("replace", str(run / "CURRENT.tmp")))
    synced_before = {target for name, target in operations[:switch] if name == "fsync"}
    must = {str(path) for path in generation.rglob("*")} | {str(generation), str(generation.parent), str(run)}
    assert must <= synced_before, sorted(must - synced_before)
    assert str(run / "CURRENT.tmp") in synced_before
    after = operations[switch + 1 :]
    assert after[0] == ("fsync", str(run))
    removals = [i for i, (name, target) in enumerate(after) if name in ("unlink", "rmdir")]
    assert removals and min(removals) > 0 and ("rmdir", str(run / GENERATIONS_DIR / "000001")) in after


def test_a_run_of_the_layout_before_generations_resumes_and_is_cleaned(
    tmp_path, small_ner_files, nano_backbone, monkeypatch
):
    """A run directory written before generations (flat checkpoint, training_state/, epoch_weights/,
    and the temporaries its interrupted saves left inside and beside it) resumes to the same
    weights, and its first commit leaves only the new layout."""
    train_file, dev_file = small_ner_files
    common = ["--task", "ner", "--train", str(train_file), "--dev", str(dev_file), "--backbone", str(nano_backbone),
              "--epochs", "2", "--average-last", "2", "--max-seq-len", "64", *FAST]  # fmt: skip
    monkeypatch.setattr(model.train, "plot_history", lambda history, path: None)
    straight = tmp_path / "straight"
    train(parse_args([*common, "--out", str(straight)]))

    def stop_after_first_epoch(epoch, record):
        raise Killed

    old = tmp_path / "old"
    with pytest.raises(Killed):
        train(parse_args([*common, "--out", str(old)]), on_epoch_end=stop_after_first_epoch)
    generation = live_generation(old)  # rearranged as the older code left it
    for path in (generation / "checkpoint").iterdir():
        path.rename(old / path.name)
    (old / "visual_training.json").unlink()
    (generation / STATE_DIR).rename(old / STATE_DIR)
    (generation / EPOCH_WEIGHTS_DIR).rename(old / EPOCH_WEIGHTS_DIR)
    (old / POINTER_FILE).unlink()
    shutil.rmtree(old / GENERATIONS_DIR)
    (old / ".state.k2j4_x9a").mkdir()  # an interrupted save_training_state
    (old / ".state.k2j4_x9a" / "state.safetensors").write_bytes(b"partial")
    (old / EPOCH_WEIGHTS_DIR / ".epoch-002.safetensors.tmp").write_bytes(b"partial")
    beside = tmp_path / ".old.q8w3e5r7"  # an interrupted save_checkpoint
    beside.mkdir()
    (beside / "model.safetensors").write_bytes(b"partial")
    unrelated = tmp_path / ".old.notes"
    unrelated.mkdir()
    assert has_checkpoint(old) and has_training_state(old)

    train(parse_args([*common, "--out", str(old), "--resume"]))
    assert_same_outcome(outcome(old), outcome(straight), "resumed from the older layout")
    assert not beside.exists() and unrelated.exists()
