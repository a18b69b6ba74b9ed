"""Sub-word tokenisation of word lists, keeping the word alignment (tokenizers only).

Models read words: NER tags each word through its first sub-token, RE marks entities by word
spans. ``TextEncoder`` turns a word list into input ids plus, for every word that fits in the
window, the position of its first sub-token.

A word with more sub-tokens than the window holds (a Chinese or Japanese sentence without spaces,
a run of 127 dots, a long hashtag) could never be read: ``split_long_words`` cuts such a word into
one word per sub-token, so that the window fills with its first pieces instead of staying empty.
No dataset token comes near it (the longest in the Twitter and MNRE training sets has 26 pieces
under MiniLM's tokenizer, the window 126), so training's words are never cut.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer

from model.config import PreprocessingConfig


@dataclass(frozen=True)
class EncodedText:
    """One example's token ids and its word alignment.

    ``word_index[i]`` is the position of word i's first sub-token; only the first ``num_words``
    words fit in the window (``truncated`` says whether some did not). ``marker_index`` holds the
    positions of the head and tail start markers (relation examples only).
    """

    input_ids: np.ndarray
    word_index: np.ndarray
    truncated: bool
    marker_index: np.ndarray | None = None
    word_shape: np.ndarray | None = None  # (num_words,) ``word_shape`` of each word that fits

    @property
    def num_words(self) -> int:
        return len(self.word_index)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` with its padding and truncation switched off (the encoder handles both)."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def add_entity_markers(tokenizer: Tokenizer, markers: Sequence[str]) -> int:
    """Adds the relation markers as special tokens (never split, never lower-cased); returns how many were new."""
    return tokenizer.add_special_tokens([AddedToken(marker, normalized=False) for marker in markers])


class TextEncoder:
    """Word lists to model inputs, for either task."""

    def __init__(self, tokenizer: Tokenizer, config: PreprocessingConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.max_seq_len = config.max_seq_len
        self.cls_id = self._token_id(config.cls_token)
        self.sep_id = self._token_id(config.sep_token)
        self.pad_id = self._token_id(config.pad_token)
        self.unk_token = config.unk_token

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token!r} token")
        return token_id

    def _word_pieces(self, words: Sequence[str]) -> tuple[list[int], list[int]]:
        """Sub-token ids and, for each, the index of the word it came from."""
        encoding = self.tokenizer.encode(list(words), is_pretokenized=True, add_special_tokens=False)
        word_ids = encoding.word_ids
        if len({w for w in word_ids if w is not None}) < len(words):
            # A word the normaliser erases entirely (a lone control or zero-width character)
            # would have no sub-token to tag: it reads as [UNK] instead.
            seen = set(word_ids)
            words = [word if i in seen else self.unk_token for i, word in enumerate(words)]
            encoding = self.tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
            word_ids = encoding.word_ids
        return encoding.ids, word_ids

    def piece_counts(self, texts: Sequence[str]) -> list[int]:
        """Each raw text's number of sub-tokens (the tokenizer's own word splitting, no truncation):
        a cheap estimate of a row's cost, for ordering many rows so that a batch pads little."""
        return [
            len(encoding.ids)
            for encoding in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        ]

    @property
    def budget(self) -> int:
        """Sub-tokens between ``[CLS]`` and ``[SEP]``."""
        return self.max_seq_len - 2

    def split_long_words(self, words: Sequence[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        """``(word, start, end)`` triples (``split_words``'s) with every word of more sub-tokens than the
        window holds cut into one word per sub-token, at the characters where each sub-token starts.

        The other words come back unchanged; the parts of a cut word are consecutive and cover it
        (characters the normaliser erases stay with the part before them), so offsets stay exact.
        """
        if not words:
            return []
        encoding = self.tokenizer.encode(
            [word for word, _, _ in words], is_pretokenized=True, add_special_tokens=False
        )
        return self._split_long(words, encoding.word_ids, encoding.offsets)

    def _split_long(
        self, words: Sequence[tuple[str, int, int]], word_ids: list[int], offsets: list[tuple[int, int]]
    ) -> list[tuple[str, int, int]]:
        """``split_long_words`` on the words' encoding (their ``word_ids`` and ``offsets``)."""
        pieces = Counter(word_ids)
        if max(pieces.values(), default=0) <= self.budget:
            return list(words)
        starts: dict[int, set[int]] = {}
        for word, (start, _) in zip(word_ids, offsets):
            if pieces[word] > self.budget:
                starts.setdefault(word, {0}).add(start)  # offsets are relative to each word
        result: list[tuple[str, int, int]] = []
        for number, (word, start, end) in enumerate(words):
            if number not in starts:
                result.append((word, start, end))
                continue
            cuts = sorted(cut for cut in starts[number] if cut < len(word))
            for left, right in zip(cuts, [*cuts[1:], len(word)]):
                result.append((word[left:right], start + left, start + right))
        return result

    def split_and_encode(
        self, words: Sequence[tuple[str, int, int]], limit: int
    ) -> tuple[list[tuple[str, int, int]], EncodedText]:
        """``split_long_words(words)`` and the ``encode`` of its first ``limit`` words, the same as
        calling both, with one pass of the tokenizer where no word is cut (nearly always): each word
        is tokenised on its own (pre-tokenised input), so the pieces of the first ``limit`` words
        are the first pieces of the whole list's."""
        if not words:
            raise ValueError("cannot encode an empty word list")
        encoding = self.tokenizer.encode(
            [word for word, _, _ in words], is_pretokenized=True, add_special_tokens=False
        )
        word_ids = encoding.word_ids
        split = self._split_long(words, word_ids, encoding.offsets)
        if len(split) != len(words):  # a word was cut: its parts are tokenised anew
            return split, self.encode([word for word, _, _ in split[:limit]])
        kept_words = min(limit, len(words))
        kept = bisect.bisect_left(word_ids, kept_words)  # word ids ascend: the pieces of those words
        prefix_ids = word_ids[:kept]
        if len(set(prefix_ids)) < kept_words:  # a word with no piece: ``_word_pieces`` reads it as [UNK]
            return split, self.encode([word for word, _, _ in split[:limit]])
        plain = [word for word, _, _ in split[:kept_words]]
        return split, self._encoded(plain, encoding.ids[:kept], prefix_ids)

    def encode(self, words: Sequence[str]) -> EncodedText:
        """``[CLS] pieces [SEP]``, cut after the last word whose pieces all fit in ``max_seq_len``.

        The first word must fit (``ValueError`` otherwise: ``split_long_words`` first), so that every
        example has at least one word to tag.
        """
        if not words:
            raise ValueError("cannot encode an empty word list")
        return self._encoded(words, *self._word_pieces(words))

    def _encoded(self, words: Sequence[str], ids: list[int], word_ids: list[int]) -> EncodedText:
        """``encode``'s answer from the words' sub-token ``ids`` and the word of each (every word has one)."""
        budget = self.budget
        kept = len(ids) if len(ids) <= budget else _whole_words_prefix(word_ids, budget)
        if kept == 0:
            raise ValueError(
                f"the first word has more than {budget} sub-tokens, more than the window holds "
                "(cut it with TextEncoder.split_long_words)"
            )
        first_piece: dict[int, int] = {}
        for position, word in enumerate(word_ids[:kept]):
            first_piece.setdefault(word, position + 1)  # +1 for [CLS]
        input_ids = np.array([self.cls_id, *ids[:kept], self.sep_id], dtype=np.int64)
        word_index = np.array([first_piece[w] for w in range(len(first_piece))], dtype=np.int64)
        shapes = np.array([word_shape(word) for word in words[: len(first_piece)]], dtype=np.int64)
        return EncodedText(
            input_ids=input_ids,
            word_index=word_index,
            truncated=len(first_piece) < len(words),
            word_shape=shapes,
        )

    def encode_relation(
        self, words: Sequence[str], head: tuple[int, int], tail: tuple[int, int]
    ) -> EncodedText:
        """The words with ``<s> head </s>`` and ``<o> tail </o>`` markers inserted around the [start, end) spans."""
        head_start, head_end, tail_start, tail_end = self.config.entity_markers
        inserts = {head[0]: [], head[1]: [], tail[0]: [], tail[1]: []}
        # At a shared boundary, closing markers go before opening ones so spans stay nested properly.
        inserts[head[1]].append(head_end)
        inserts[tail[1]].append(tail_end)
        inserts[head[0]].append(head_start)
        inserts[tail[0]].append(tail_start)
        marked: list[str] = []
        marker_word: dict[str, int] = {}
        for position in range(len(words) + 1):
            for marker in inserts.get(position, []):
                marker_word[marker] = len(marked)
                marked.append(marker)
            if position < len(words):
                marked.append(words[position])
        encoded = self.encode(marked)
        # A marker cut off by truncation falls back to [CLS] (position 0).
        marker_index = np.array(
            [
                encoded.word_index[marker_word[m]] if marker_word[m] < encoded.num_words else 0
                for m in (head_start, tail_start)
            ],
            dtype=np.int64,
        )
        return EncodedText(
            encoded.input_ids, encoded.word_index, encoded.truncated, marker_index, encoded.word_shape
        )


#: The word shapes ``word_shape`` tells apart (0 is padding).
WORD_SHAPES = ("pad", "lower", "title", "upper", "mixed", "digits", "other", "mention", "hashtag", "url")
_SHAPE_ID = {name: number for number, name in enumerate(WORD_SHAPES)}


def word_shape(word: str) -> int:
    """The casing class of a word, as an id into ``WORD_SHAPES``: what an uncased backbone loses.

    An uncased tokenizer reads "Apple", "APPLE" and "apple" alike, while in tweets capitals are
    the strongest cue for a name; NER models on such a backbone add this id as a feature of each
    word (``IMMConfig.word_shape_size``). ``@mention``, ``#hashtag`` and URLs get their own classes.
    """
    if word.startswith("@") and len(word) > 1:
        return _SHAPE_ID["mention"]
    if word.startswith("#") and len(word) > 1:
        return _SHAPE_ID["hashtag"]
    lowered = word.lower()
    if lowered.startswith(("http://", "https://", "www.")):
        return _SHAPE_ID["url"]
    if word.isalpha() and word.isascii():
        # Most words: ASCII letters only, whose string tests answer for every letter at once.
        if word.islower():
            return _SHAPE_ID["lower"]
        if word.isupper():
            return _SHAPE_ID["upper"] if len(word) > 1 else _SHAPE_ID["title"]
        return _SHAPE_ID["title"] if word[0].isupper() and word[1:].islower() else _SHAPE_ID["mixed"]
    return _shape_by_letter(word)


def _shape_by_letter(word: str) -> int:
    """``word_shape``'s casing classes (digits to mixed), letter by letter: any script."""
    letters = [c for c in word if c.isalpha()]
    if any(c.isdigit() for c in word) and len(letters) < len(word) / 2:
        return _SHAPE_ID["digits"]
    if not letters:
        return _SHAPE_ID["other"]
    if all(c.islower() or not c.isupper() for c in letters):
        return _SHAPE_ID["lower"]
    if all(c.isupper() for c in letters):
        return _SHAPE_ID["upper"] if len(letters) > 1 else _SHAPE_ID["title"]
    if letters[0].isupper() and all(not c.isupper() for c in letters[1:]):
        return _SHAPE_ID["title"]
    return _SHAPE_ID["mixed"]


def _whole_words_prefix(word_ids: Sequence[int], budget: int) -> int:
    """How many leading pieces to keep so that no word is cut in the middle."""
    cut = budget
    while cut > 0 and word_ids[cut] == word_ids[cut - 1]:
        cut -= 1
    return cut
