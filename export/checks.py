"""Argument checks that run before any heavy import, so a bad command fails in a blink (torch-free)."""

from __future__ import annotations

import re
from pathlib import Path

from export.bundle import MANIFEST_FILE, MAX_OPSET, MIN_OPSET, PRECISIONS, TOKENIZER_FILE
from model.run_directory import CheckpointError, resolve_checkpoint

__all__ = ["CHECKPOINT_FILES", "ExportError", "check_export_arguments", "safe_model_name"]

# model.modeling.WEIGHTS_FILE, model.modeling.CONFIG_FILE and the tokenizer: what load_checkpoint needs.
CHECKPOINT_FILES = ("model.safetensors", "config.json", TOKENIZER_FILE)


class ExportError(RuntimeError):
    """The export cannot run with these arguments, or could not produce a bundle that matches its checkpoint."""


def check_export_arguments(checkpoint_dir: Path, out_dir: Path, precision: str, opset: int) -> None:
    """Raises :class:`ExportError` for a precision, opset, checkpoint or output directory that cannot work."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET}")
    if not checkpoint_dir.is_dir():
        raise ExportError(f"checkpoint {checkpoint_dir} is not a directory")
    try:
        files = resolve_checkpoint(checkpoint_dir)  # a training run's live generation
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    missing = [name for name in CHECKPOINT_FILES if not (files / name).is_file()]
    if missing:
        raise ExportError(f"{checkpoint_dir} is not an IMM checkpoint: missing {', '.join(missing)}")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"--out {out_dir} exists and is not a directory")
        if out_dir.resolve() == checkpoint_dir.resolve():
            raise ExportError("--out must not be the checkpoint directory")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
            raise ExportError(f"--out {out_dir} exists and is not a bundle; refusing to replace it")


def safe_model_name(raw: str) -> str:
    """A name safe for the manifest, file systems and Triton: letters, digits, '_', '-', '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("._") or "imm"
