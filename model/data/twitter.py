"""Reader for the Twitter-2015 / Twitter-2017 MNER files (CoNLL style, see data/README.md).

Each tweet is an ``IMGID:<id>`` line, one ``token<TAB>tag`` line per word, then a blank line. Tags are
normalised so that both datasets share one label set: OTHER (2015) becomes MISC (2017's name), and an
``I-X`` that does not continue an X entity becomes ``B-X``, which is how seqeval's default mode reads it
(so the gold entity spans are unchanged, and a CRF only ever sees valid IOB2 sequences).
"""

from __future__ import annotations

from pathlib import Path

from model.data.examples import DataFormatError, NERExample

__all__ = ["NER_LABELS", "read_twitter_conll"]

NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC")

_IMAGE_PREFIX = "IMGID:"
# Tags as they appear in the files (before normalisation): both datasets' names for the fourth type.
_FILE_TAGS = frozenset(NER_LABELS) | {"B-OTHER", "I-OTHER"}


def _normalise_tag(tag: str) -> str:
    return tag[:2] + "MISC" if tag.endswith("-OTHER") else tag


def _repair_iob2(tags: list[str]) -> tuple[str, ...]:
    """Turn every ``I-X`` that does not follow ``B-X``/``I-X`` into ``B-X`` (seqeval's default reading)."""
    repaired: list[str] = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        repaired.append(tag)
        previous = tag
    return tuple(repaired)


def read_twitter_conll(path: str | Path) -> list[NERExample]:
    """Read a Twitter-2015/2017 file into examples with tags from ``NER_LABELS``.

    Tolerates CRLF line endings, a UTF-8 BOM, several blank lines in a row and a missing final blank line.
    A tweet without an ``IMGID`` line gets ``image_id=None``. Raises ``DataFormatError`` (naming the file
    and the 1-based line) for a line that is not ``token<TAB>tag`` with a non-empty token and a known tag;
    a missing file raises ``FileNotFoundError``.
    """
    examples: list[NERExample] = []
    words: list[str] = []
    tags: list[str] = []
    image_id: str | None = None

    def flush() -> None:
        nonlocal words, tags, image_id
        if words:
            examples.append(NERExample(tuple(words), _repair_iob2(tags), image_id))
        words, tags, image_id = [], [], None

    # utf-8-sig drops a BOM; newline="" + rstrip keeps line numbers right with CRLF or a lone CR.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            line = raw_line.rstrip("\r\n")
            if not line.strip():
                flush()
                continue
            if line.startswith(_IMAGE_PREFIX) and "\t" not in line:
                # A new tweet may start without a blank line before it. (A tab means a token "IMGID:...".)
                flush()
                image_name = line[len(_IMAGE_PREFIX) :].strip()
                if not image_name:
                    raise DataFormatError(path, line_number, "IMGID line without an image id")
                image_id = image_name + ".jpg"
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataFormatError(
                    path, line_number, f"expected 'token<TAB>tag', got {len(fields)} tab-separated field(s)"
                )
            word, tag = fields[0], fields[1].strip()
            # Only "" is refused: Twitter-2015 has a real token that is a lone no-break space, kept as is.
            if not word:
                raise DataFormatError(path, line_number, "empty token")
            if tag not in _FILE_TAGS:
                raise DataFormatError(path, line_number, f"unknown tag {tag!r}")
            words.append(word)
            tags.append(_normalise_tag(tag))
    flush()
    return examples
