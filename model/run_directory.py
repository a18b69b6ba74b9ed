"""Checkpoint and training-run directories: complete generations behind one pointer (torch-free).

Layout of a directory written by ``model.train`` (``--out``) or ``save_checkpoint``::

    OUT/
      CURRENT                  the live generation's name, one line ("000007")
      generations/000007/
        checkpoint/            model.safetensors, config.json, tokenizer.json, training_args.json,
                               scores.json, visual_training.json
        training_state/        what ``--resume`` needs (model.train only)
        epoch_weights/         the last K epochs' weights (model.train ``--average-last K``)
      metrics.jsonl            model.train's history, rewritten from the state after each save
      training_curves.png

A save is one atomic switch:

1. ``next_generation`` removes the debris of interrupted saves (every entry of ``generations/``
   but the live one, a stray ``CURRENT.tmp``) and creates ``generations/<live + 1>/``;
2. the writer fills it: new files are written, unchanged ones hard-linked from the live
   generation (``link_or_copy``: a copy where the file system has no hard links);
3. ``commit`` fsyncs every file and directory of the new generation, writes ``CURRENT.tmp``,
   fsyncs it, renames it over ``CURRENT`` (the switch) and fsyncs ``OUT``; then it removes the
   previous generation.

A kill before the rename leaves the previous generation live and the new one as debris; a kill
after it, the new one live and the old one as debris. Either way ``CURRENT`` names a complete,
durable generation (or does not exist yet: nothing was ever committed), and the next save or
training start sweeps the debris. Files are never changed in place, which is what makes sharing
them between generations through hard links safe.

Readers take ``OUT`` and call :func:`resolve_checkpoint` (``load_checkpoint``, ``export``,
``model.evaluate``, ``--init-from`` do). A directory without ``CURRENT`` is read as a flat
checkpoint, its files at the top: the layout written before generations existed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

POINTER_FILE = "CURRENT"
POINTER_STAGING = "CURRENT.tmp"
GENERATIONS_DIR = "generations"
CHECKPOINT_DIR = "checkpoint"

_GENERATION_NAME = re.compile(r"\d{6}")


class CheckpointError(ValueError):
    """A directory that is not a usable checkpoint."""


def live_generation(directory: str | Path) -> Path | None:
    """The generation ``CURRENT`` names, or None when nothing was ever committed in ``directory``."""
    directory = Path(directory)
    pointer = directory / POINTER_FILE
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    generation = directory / GENERATIONS_DIR / name
    if not _GENERATION_NAME.fullmatch(name) or not generation.is_dir():
        raise CheckpointError(
            f"{pointer} names no generation of {directory} ({name!r}): it was changed by hand"
        )
    return generation


def resolve_checkpoint(directory: str | Path) -> Path:
    """The directory that holds the checkpoint files of ``directory``: the live generation's
    ``checkpoint/``, or ``directory`` itself when it is a flat checkpoint (no ``CURRENT``)."""
    directory = Path(directory)
    generation = live_generation(directory)
    return directory if generation is None else generation / CHECKPOINT_DIR


def next_generation(directory: str | Path) -> Path:
    """Sweeps the debris of interrupted saves, then creates and returns the next generation's
    (empty) directory. Nothing in it is visible to readers until :func:`commit`."""
    directory = Path(directory)
    if not directory.is_dir():
        directory.mkdir(parents=True)
        fsync_directory(directory.parent)
    live = live_generation(directory)
    remove_debris(directory, live)
    generation = directory / GENERATIONS_DIR / f"{int(live.name) + 1 if live else 1:06d}"
    generation.mkdir(parents=True)
    return generation


def commit(directory: str | Path, generation: Path) -> None:
    """Makes ``generation`` (filled since :func:`next_generation`) the live one, durably, in one
    rename; then removes the generations before it."""
    directory = Path(directory)
    for root, _, files in os.walk(generation, topdown=False):
        for name in sorted(files):
            fsync_file(Path(root) / name)
        fsync_directory(Path(root))
    fsync_directory(generation.parent)
    fsync_directory(directory)
    staging = directory / POINTER_STAGING
    with open(staging, "w", encoding="utf-8") as handle:
        handle.write(generation.name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, directory / POINTER_FILE)
    fsync_directory(directory)
    remove_debris(directory, generation)


def remove_debris(directory: str | Path, live: Path | None) -> None:
    """Removes every generation but ``live`` (interrupted saves, superseded generations) and a stray
    ``CURRENT.tmp``. Never touches ``live``."""
    directory = Path(directory)
    generations = directory / GENERATIONS_DIR
    if live is None:
        remove_path(generations)
    elif generations.is_dir():
        for entry in sorted(generations.iterdir()):
            if entry.name != live.name:
                remove_path(entry)
    (directory / POINTER_STAGING).unlink(missing_ok=True)


def remove_path(path: Path) -> None:
    """Removes a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def link_or_copy(source: Path, target: Path) -> None:
    """Shares an unchanged file with the new generation: a hard link, or a copy where links fail
    (another file system, one without links)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_directory(path: Path) -> None:
    """Makes the directory's entries (new files, renames) durable. POSIX only: Windows cannot open
    a directory, and its renames are not made durable this way."""
    if os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
