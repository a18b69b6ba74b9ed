"""What ``--resume`` needs to continue a run: weights, optimizer and scheduler state, progress.

Tensors go to safetensors, everything else to JSON: nothing is pickled. The state is written
at the end of every epoch into a staging directory that replaces the previous one, so a run
killed at any moment resumes from its last complete epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_DIR = "training_state"
TENSORS_FILE = "state.safetensors"
PROGRESS_FILE = "progress.json"
EPOCH_WEIGHTS_DIR = "epoch_weights"


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


def save_training_state(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
) -> None:
    optimizer_tensors, optimizer_rest = _optimizer_tensors(optimizer)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(optimizer_tensors)
    document = {"progress": progress, "optimizer": optimizer_rest, "scheduler": scheduler.state_dict()}
    staging = Path(tempfile.mkdtemp(prefix=".state.", dir=run_dir))
    try:
        save_file(tensors, str(staging / TENSORS_FILE))
        (staging / PROGRESS_FILE).write_text(json.dumps(document, indent=1), encoding="utf-8")
        target = run_dir / STATE_DIR
        retired = run_dir / f".{STATE_DIR}.old"
        shutil.rmtree(retired, ignore_errors=True)
        if target.exists():
            os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def has_training_state(run_dir: Path) -> bool:
    return (run_dir / STATE_DIR / PROGRESS_FILE).is_file() or (
        run_dir / f".{STATE_DIR}.old" / PROGRESS_FILE
    ).is_file()


def load_training_state(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restores model, optimizer and scheduler in place; returns the saved progress."""
    directory = run_dir / STATE_DIR
    if not (directory / PROGRESS_FILE).is_file():  # killed between the two renames of a save
        directory = run_dir / f".{STATE_DIR}.old"
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


def _epoch_weights_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / EPOCH_WEIGHTS_DIR / f"epoch-{epoch:03d}.safetensors"


def save_epoch_weights(run_dir: Path, model: torch.nn.Module, epoch: int, keep: int) -> None:
    """Keeps the weights after ``epoch`` (and those of the ``keep - 1`` epochs before it) for averaging."""
    directory = run_dir / EPOCH_WEIGHTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    target = _epoch_weights_path(run_dir, epoch)
    staging = target.with_name(f".{target.name}.tmp")
    save_file(tensors, str(staging))
    os.replace(staging, target)
    for old in directory.glob("epoch-*.safetensors"):
        if int(old.stem.removeprefix("epoch-")) <= epoch - keep:
            old.unlink()


def averaged_epoch_weights(run_dir: Path, epochs: list[int]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the weights kept after ``epochs`` (checkpoint averaging)."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for epoch in epochs:
        for name, tensor in load_file(str(_epoch_weights_path(run_dir, epoch))).items():
            dtypes[name] = tensor.dtype
            total[name] = total[name] + tensor.double() if name in total else tensor.double()
    return {name: (tensor / len(epochs)).to(dtypes[name]) for name, tensor in total.items()}
