"""What ``--resume`` needs to continue a run, saved with the checkpoint in one atomic switch.

At the end of every epoch ``save_generation`` writes the run directory's next generation
(``model.run_directory``): the checkpoint (new when the epoch is the best so far, else shared
with the live generation), the training state (weights, optimizer and scheduler state,
progress) and, for ``--average-last K``, the last K epochs' weights; then it switches to it with
one rename. A run killed at any moment resumes from its last committed epoch, and its checkpoint,
state and epoch weights always belong together.

Tensors go to safetensors, everything else to JSON: nothing is pickled.

A run directory of the layout before generations (``training_state/`` and ``epoch_weights/``
beside a flat checkpoint) still resumes: its state is read from there, and the first commit
replaces that layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CHECKPOINT_FILES
from model.run_directory import (
    CHECKPOINT_DIR,
    commit,
    link_or_copy,
    live_generation,
    next_generation,
    remove_debris,
    remove_path,
    resolve_checkpoint,
)

STATE_DIR = "training_state"
TENSORS_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"
EPOCH_WEIGHTS_DIR = "epoch_weights"

# The layout before generations: its state could sit in .training_state.old after a kill, and its
# interrupted saves left .state.XXXXXXXX inside the run directory and .<name>.XXXXXXXX beside it.
_LEGACY_RETIRED_STATE = f".{STATE_DIR}.old"
_MKDTEMP_SUFFIX = r"\.[a-z0-9_]{8}"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_generation(
    run_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
    new_checkpoint: Callable[[Path], None] | None,
    keep_epochs: int = 1,
    new_epoch: int | None = None,
) -> Path:
    """Commits the run's next generation: ``new_checkpoint`` writes a new checkpoint into the
    directory it is given (None: the live checkpoint is kept), the training state is ``model``,
    ``optimizer``, ``scheduler`` and ``progress``; with ``keep_epochs`` > 1, ``model``'s weights
    are kept as those of ``new_epoch`` (if given) beside the ``keep_epochs - 1`` epochs before it.
    Returns the new generation's directory."""
    run_dir = Path(run_dir)
    legacy = live_generation(run_dir) is None and _state_dir(run_dir) is not None
    previous_checkpoint = resolve_checkpoint(run_dir)
    previous_weights = _epoch_weights_dir(run_dir)
    generation = next_generation(run_dir)

    checkpoint = generation / CHECKPOINT_DIR
    if new_checkpoint is not None:
        new_checkpoint(checkpoint)
    else:
        checkpoint.mkdir()
        for name in CHECKPOINT_FILES:
            if (previous_checkpoint / name).is_file():
                link_or_copy(previous_checkpoint / name, checkpoint / name)

    _write_training_state(generation / STATE_DIR, model, optimizer, scheduler, progress)

    if keep_epochs > 1:
        weights = generation / EPOCH_WEIGHTS_DIR
        weights.mkdir()
        kept = {epoch: path for epoch, path in _epoch_files(previous_weights).items() if epoch != new_epoch}
        latest = max([*kept, *([new_epoch] if new_epoch is not None else [])], default=0)
        for epoch, path in sorted(kept.items()):
            if epoch > latest - keep_epochs:
                link_or_copy(path, weights / path.name)
        if new_epoch is not None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(tensors, str(_epoch_weights_path(weights, new_epoch)))

    commit(run_dir, generation)
    if legacy:
        remove_legacy_layout(run_dir)
    return generation


def _write_training_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
) -> None:
    optimizer_tensors, optimizer_rest = _optimizer_tensors(optimizer)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(optimizer_tensors)
    document = {"progress": progress, "optimizer": optimizer_rest, "scheduler": scheduler.state_dict()}
    directory.mkdir()
    save_file(tensors, str(directory / TENSORS_FILE))
    (directory / PROGRESS_FILE).write_text(json.dumps(document, indent=1), encoding="utf-8")


def _state_dir(run_dir: Path) -> Path | None:
    """The committed training state: the live generation's, or (older layout) the run directory's."""
    live = live_generation(run_dir)
    candidates = (
        [live / STATE_DIR] if live is not None else [run_dir / STATE_DIR, run_dir / _LEGACY_RETIRED_STATE]
    )
    for directory in candidates:
        if (directory / PROGRESS_FILE).is_file() and (directory / TENSORS_FILE).is_file():
            return directory
    return None


def has_training_state(run_dir: Path) -> bool:
    return _state_dir(Path(run_dir)) is not None


def load_training_state(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restores model, optimizer and scheduler in place; returns the saved progress."""
    directory = _state_dir(Path(run_dir))
    if directory is None:
        raise FileNotFoundError(f"{run_dir} holds no training state")
    document = json.loads((directory / PROGRESS_FILE).read_text(encoding="utf-8"))
    tensors = load_file(str(directory / TENSORS_FILE))
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for key, value in document["optimizer"]["scalars"].items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": document["optimizer"]["param_groups"]})
    scheduler.load_state_dict(document["scheduler"])
    return document["progress"]


def _epoch_weights_dir(run_dir: Path) -> Path:
    live = live_generation(run_dir)
    return (live if live is not None else run_dir) / EPOCH_WEIGHTS_DIR


def _epoch_weights_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:03d}.safetensors"


def _epoch_files(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    return {
        int(path.name[6:9]): path
        for path in directory.iterdir()
        if re.fullmatch(r"epoch-\d{3}\.safetensors", path.name)
    }


def kept_epoch_weights(run_dir: Path) -> dict[int, Path]:
    """The committed epoch weights (``--average-last``), by epoch."""
    return _epoch_files(_epoch_weights_dir(Path(run_dir)))


def averaged_epoch_weights(run_dir: Path, epochs: list[int]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the committed weights of ``epochs`` (checkpoint averaging)."""
    files = kept_epoch_weights(run_dir)
    missing = [epoch for epoch in epochs if epoch not in files]
    if missing:
        raise FileNotFoundError(f"{run_dir} keeps no weights of epoch(s) {missing}")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for epoch in epochs:
        for name, tensor in load_file(str(files[epoch])).items():
            dtypes[name] = tensor.dtype
            total[name] = total[name] + tensor.double() if name in total else tensor.double()
    return {name: (tensor / len(epochs)).to(dtypes[name]) for name, tensor in total.items()}


# --- cleaning up ---------------------------------------------------------------------------------


def remove_stale_temporaries(run_dir: Path) -> None:
    """Removes what interrupted saves left in and beside ``run_dir``: uncommitted or superseded
    generations, and the temporaries of the older layout. Committed state is never touched."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    remove_debris(run_dir, live_generation(run_dir))
    for path in run_dir.glob(".state.*"):
        if re.fullmatch(r"\.state" + _MKDTEMP_SUFFIX, path.name) and path.is_dir():
            remove_path(path)
    for path in (run_dir / EPOCH_WEIGHTS_DIR).glob(".epoch-*.safetensors.tmp"):
        path.unlink(missing_ok=True)
    # The older save_checkpoint staged a whole checkpoint beside the run directory.
    beside = re.compile(re.escape(f".{run_dir.name}") + _MKDTEMP_SUFFIX)
    for path in run_dir.parent.iterdir():
        if (
            beside.fullmatch(path.name)
            and path.is_dir()
            and {child.name for child in path.iterdir()} <= set(CHECKPOINT_FILES)
        ):
            remove_path(path)


def remove_legacy_layout(run_dir: Path) -> None:
    """After the first commit in a run directory of the older layout: its flat checkpoint, state
    and epoch weights are superseded by the live generation."""
    for name in (*CHECKPOINT_FILES, STATE_DIR, _LEGACY_RETIRED_STATE, EPOCH_WEIGHTS_DIR):
        remove_path(run_dir / name)
