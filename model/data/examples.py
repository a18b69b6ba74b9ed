"""The examples the readers produce, and the error they raise on malformed input (stdlib only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataFormatError", "NERExample", "REExample"]


@dataclass(frozen=True)
class NERExample:
    """One tweet for NER: its words, one IOB2 tag per word, and its image file name (None if it has none)."""

    words: tuple[str, ...]
    tags: tuple[str, ...]
    image_id: str | None


@dataclass(frozen=True)
class REExample:
    """One entity pair of a tweet for RE. ``head`` and ``tail`` are [start, end) word indices."""

    words: tuple[str, ...]
    head: tuple[int, int]
    tail: tuple[int, int]
    relation: str
    image_id: str | None


class DataFormatError(ValueError):
    """A malformed line in a dataset file. The message starts with ``"{path}:{line_number}: "``."""

    def __init__(self, path: str | Path, line_number: int, problem: str):
        super().__init__(f"{path}:{line_number}: {problem}")
        self.path = str(path)
        self.line_number = line_number
        self.problem = problem
