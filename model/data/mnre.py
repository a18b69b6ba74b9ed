"""Reader for the MNRE relation-extraction files (see data/README.md).

One entity pair per line, written as a Python dict literal (single quotes, so ``ast.literal_eval`` and not
``json``): ``token`` (the words), ``h`` and ``t`` (head and tail, ``{'name': ..., 'pos': [start, end]}``),
``img_id`` (the image file name) and ``relation`` (one of ``MNRE_RELATIONS``).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from model.data.examples import DataFormatError, REExample

__all__ = ["MNRE_RELATIONS", "NO_RELATION", "read_mnre"]

# The 23 relations in id order, as in MNRE's rel2id.json ("alumi" is MNRE's own spelling).
MNRE_RELATIONS = (
    "None",
    "/per/per/parent",
    "/per/per/siblings",
    "/per/per/couple",
    "/per/per/neighbor",
    "/per/per/peer",
    "/per/per/charges",
    "/per/per/alumi",
    "/per/per/alternate_names",
    "/per/org/member_of",
    "/per/loc/place_of_residence",
    "/per/loc/place_of_birth",
    "/org/org/alternate_names",
    "/org/org/subsidiary",
    "/org/loc/locate_at",
    "/loc/loc/contain",
    "/per/misc/present_in",
    "/per/misc/awarded",
    "/per/misc/race",
    "/per/misc/religion",
    "/per/misc/nationality",
    "/misc/misc/part_of",
    "/misc/loc/held_on",
)
NO_RELATION = "None"

_KEYS = ("token", "h", "t", "img_id", "relation")


def _span(record: dict[str, Any], key: str, num_words: int) -> tuple[int, int]:
    """The [start, end) word span of entity ``key`` ("h" or "t"); ValueError with the reason if invalid."""
    entity = record[key]
    if not isinstance(entity, dict) or "pos" not in entity:
        raise ValueError(f"{key!r} must be a dict with a 'pos' key")
    pos = entity["pos"]
    if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and all(type(i) is int for i in pos)):
        raise ValueError(f"{key}['pos'] must be two integers, got {pos!r}")
    start, end = pos
    if not 0 <= start < end <= num_words:
        raise ValueError(f"{key}['pos'] {pos!r} is empty or outside the {num_words} words")
    return start, end


def _parse_line(line: str) -> REExample:
    """One MNRE line into an example; ValueError/SyntaxError with the reason if it is malformed."""
    expected = (
        "expected one MNRE record per line, a dict literal such as {'token': [...], 'h': {'name': ..., "
        "'pos': [start, end]}, 't': {...}, 'img_id': ..., 'relation': ...}"
    )
    try:
        record = ast.literal_eval(line)
    except (SyntaxError, ValueError):
        hint = (
            " (this looks like a CoNLL file: NER data, not RE)"
            if "\t" in line or " " not in line.strip()
            else ""
        )
        raise ValueError(f"{expected}; this line is not one{hint}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{expected}; got a {type(record).__name__}")
    missing = [key for key in _KEYS if key not in record]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    words = record["token"]
    if not (isinstance(words, list) and words and all(isinstance(w, str) and w for w in words)):
        raise ValueError("'token' must be a non-empty list of non-empty strings")
    relation = record["relation"]
    if relation not in MNRE_RELATIONS:
        raise ValueError(f"unknown relation {relation!r}")
    image_id = record["img_id"]
    if image_id is not None and not isinstance(image_id, str):
        raise ValueError(f"'img_id' must be a string, got {image_id!r}")
    return REExample(
        words=tuple(words),
        head=_span(record, "h", len(words)),
        tail=_span(record, "t", len(words)),
        relation=relation,
        image_id=image_id or None,
    )


def read_mnre(path: str | Path) -> list[REExample]:
    """Read an MNRE file, skipping blank lines.

    Raises ``DataFormatError`` (naming the file and the 1-based line) for a line that does not parse, lacks
    a key, has an empty or out-of-range span or an unknown relation; a missing file raises
    ``FileNotFoundError``.
    """
    examples: list[REExample] = []
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                examples.append(_parse_line(line.strip()))
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
                # literal_eval reports bad syntax as SyntaxError/ValueError; keep its reason in the message.
                reason = error.msg if isinstance(error, SyntaxError) else str(error)
                raise DataFormatError(path, line_number, reason or type(error).__name__) from error
    return examples
