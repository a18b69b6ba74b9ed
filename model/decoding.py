"""CRF decoding and BIO span extraction in numpy, shared by evaluation and the server (no torch).

``viterbi_decode`` and ``crf_marginals`` are the numpy twin of ``model.crf.CRF``, the project's one
torch CRF (training and the GPU runtime): they exist for the torch-free ONNX server, which must not
import torch, and are tested equal to it, to pytorch-crf's ``decode`` and to brute force.

The CRF parameters follow pytorch-crf (``torchcrf.CRF``): ``transitions[i, j]`` scores moving from tag i to
tag j, ``start_transitions[t]`` scores starting with tag t and ``end_transitions[t]`` ending with it. The
score of a tag sequence y over a row of length n is::

    start[y0] + sum_i emissions[i, y_i] + sum_{i>=1} transitions[y_{i-1}, y_i] + end[y_{n-1}]

so a model trained with pytorch-crf decodes the same here, on ONNX Runtime outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bio_spans", "char_spans", "crf_marginals", "viterbi_decode"]


def _checked_inputs(
    emissions: np.ndarray,
    mask: np.ndarray,
    transitions: np.ndarray,
    start_transitions: np.ndarray,
    end_transitions: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 copies of the CRF inputs, plus each row's length."""
    emissions = np.asarray(emissions, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if emissions.ndim != 3:
        raise ValueError(f"emissions must be (batch, words, tags), got shape {emissions.shape}")
    batch, num_words, num_tags = emissions.shape
    if mask.shape != (batch, num_words):
        raise ValueError(f"mask must have shape {(batch, num_words)}, got {mask.shape}")
    transitions = np.asarray(transitions, dtype=np.float64)
    start_transitions = np.asarray(start_transitions, dtype=np.float64)
    end_transitions = np.asarray(end_transitions, dtype=np.float64)
    if transitions.shape != (num_tags, num_tags):
        raise ValueError(f"transitions must have shape {(num_tags, num_tags)}, got {transitions.shape}")
    if start_transitions.shape != (num_tags,) or end_transitions.shape != (num_tags,):
        raise ValueError(f"start and end transitions must have shape {(num_tags,)}")
    if batch and (num_words == 0 or not mask[:, 0].all()):
        raise ValueError("every row needs at least one word, and the mask must start with True")
    # Leading True then only False: the mask never switches back on.
    if num_words > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask must be contiguous: True for a row's words, then False for padding")
    lengths = mask.sum(axis=1)
    return emissions, mask, transitions, start_transitions, end_transitions, lengths


def viterbi_decode(
    emissions: np.ndarray,
    mask: np.ndarray,
    transitions: np.ndarray,
    start_transitions: np.ndarray,
    end_transitions: np.ndarray,
) -> list[list[int]]:
    """The best tag sequence of each row, as lists of tag ids of the row's length (like ``CRF.decode``).

    ``emissions`` is (batch, words, tags), ``mask`` (batch, words) is True on each row's words, which come
    first. Vectorised over the batch; loops over word positions only.
    """
    emissions, mask, transitions, start, end, lengths = _checked_inputs(
        emissions, mask, transitions, start_transitions, end_transitions
    )
    if emissions.shape[0] == 0:
        return []
    return _viterbi(emissions, mask, lengths, transitions, start, end)


def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(values))) along ``axis``, stable, and -inf (not nan) where all values are -inf."""
    peak = values.max(axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        summed = np.log(np.exp(values - peak).sum(axis=axis, keepdims=True)) + peak
    return summed.squeeze(axis)


def crf_marginals(
    emissions: np.ndarray,
    mask: np.ndarray,
    transitions: np.ndarray,
    start_transitions: np.ndarray,
    end_transitions: np.ndarray,
) -> np.ndarray:
    """Posterior probability of each tag at each word, P(y_i = t | x), by forward-backward in log space.

    Returns a float64 array (batch, words, tags) whose rows sum to 1 on real words and are 0 on padding.
    Useful as per-word confidences of the CRF.
    """
    emissions, mask, transitions, start, end, lengths = _checked_inputs(
        emissions, mask, transitions, start_transitions, end_transitions
    )
    if emissions.shape[0] == 0:
        return np.zeros(emissions.shape)
    return _marginals(emissions, mask, lengths, transitions, start, end)


def _log_space_marginals(emissions, mask, lengths, transitions, start, end) -> np.ndarray:
    """Forward-backward in log space: exact where every path's probability underflows ``exp``."""
    batch, num_words, num_tags = emissions.shape
    # alpha[:, i, t]: log-sum of the scores of all prefixes ending in tag t at word i.
    alpha = np.empty((batch, num_words, num_tags))
    alpha[:, 0] = start + emissions[:, 0]
    for i in range(1, num_words):
        step = _logsumexp(alpha[:, i - 1, :, None] + transitions[None], axis=1) + emissions[:, i]
        # On padding, carry the last word's alpha (its value there is never used).
        alpha[:, i] = np.where(mask[:, i, None], step, alpha[:, i - 1])
    # beta[:, i, t]: log-sum of the scores of all suffixes after word i, given tag t at word i.
    beta = np.empty((batch, num_words, num_tags))
    beta[:, num_words - 1] = end
    for i in range(num_words - 2, -1, -1):
        step = _logsumexp(transitions[None] + (emissions[:, i + 1] + beta[:, i + 1])[:, None, :], axis=2)
        # A row whose word i is its last (or padding) keeps beta = end, carried down from the padding.
        beta[:, i] = np.where(mask[:, i + 1, None], step, beta[:, i + 1])
    last_alpha = alpha[np.arange(batch), lengths - 1]
    log_partition = _logsumexp(last_alpha + end, axis=1)  # (batch,)
    with np.errstate(invalid="ignore"):
        marginals = np.exp(alpha + beta - log_partition[:, None, None])
    return np.where(mask[:, :, None], np.nan_to_num(marginals), 0.0)


def _step_matrices(steps: np.ndarray, mask: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """``steps`` (batch, words - 1, tags, tags) as (words - 1, batch, tags, tags), contiguous (a loop over
    words takes each step's matrices as one block), a padded position's matrices replaced by ``carry``."""
    if not mask.all():
        steps = np.where(mask[:, 1:, None, None], steps, carry)
    return np.ascontiguousarray(steps.transpose(1, 0, 2, 3))


def _viterbi(emissions, mask, lengths, transitions, start, end) -> list[list[int]]:
    batch, num_words, num_tags = emissions.shape
    # One (from, to) score matrix per step, made in one pass; a padded position's matrix keeps the tag
    # (0 on the diagonal, -inf elsewhere), so each row ends with its last word's scores and tag. The loop
    # writes into preallocated arrays: at batch 1 numpy's per-call overhead is the whole cost.
    keep = np.where(np.eye(num_tags, dtype=bool), 0.0, -np.inf)
    steps = _step_matrices(transitions + emissions[:, 1:, None, :], mask, keep)
    score = (start + emissions[:, 0])[:, :, None]  # (batch, tags, 1): best score of a path ending in each tag
    candidates = np.empty((batch, num_tags, num_tags))  # (batch, from, to)
    backpointers = np.empty((num_words - 1, batch, num_tags), dtype=np.intp)
    for i in range(num_words - 1):
        np.add(score, steps[i], out=candidates)
        candidates.argmax(axis=1, out=backpointers[i])
        candidates.max(axis=1, out=score[:, :, 0])
    rows = np.arange(batch)
    tags = np.empty((num_words, batch), dtype=np.intp)
    tags[-1] = (score[:, :, 0] + end).argmax(axis=1)
    for i in range(num_words - 1, 0, -1):
        tags[i - 1] = backpointers[i - 1][rows, tags[i]]
    return [tags[: lengths[b], b].tolist() for b in range(batch)]


def _scaled_exp(scores: np.ndarray, axis: int | None = None) -> np.ndarray:
    """exp(scores - their finite maximum along ``axis``): at most 1, -inf gives 0."""
    peak = np.max(scores, axis=axis, keepdims=axis is not None)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    return np.exp(scores - peak)


# Forward and backward vectors are rescaled every this many words: each step's factors are at most 1,
# so a vector shrinks by at most a few e-folds per word, far from float64's 1e-308 within this many.
_RESCALE_EVERY = 8


def _marginals(emissions, mask, lengths, transitions, start, end) -> np.ndarray:
    """Forward-backward in probability space: one matrix product per word and direction, a fifth of the
    numpy calls of the log-space recursion. Scores are shifted to their maximum before ``exp`` (nothing
    overflows) and the vectors rescaled now and then; each word's marginals are normalised at the end,
    which cancels every scale. A row where every path underflows (scores hundreds apart) is redone in
    log space."""
    batch, num_words, num_tags = emissions.shape
    with np.errstate(under="ignore", divide="ignore", invalid="ignore"):
        words = _scaled_exp(emissions, axis=2)
        steps = _step_matrices(_scaled_exp(transitions) * words[:, 1:, None, :], mask, np.eye(num_tags))
        alpha = np.empty((num_words, batch, 1, num_tags))  # row vectors: alpha[i] = alpha[i - 1] @ step
        beta = np.empty((num_words, batch, num_tags, 1))  # column vectors: beta[i] = step @ beta[i + 1]
        alpha[0, :, 0] = _scaled_exp(start) * words[:, 0]
        beta[-1, :, :, 0] = _scaled_exp(end)
        for i in range(1, num_words):
            np.matmul(alpha[i - 1], steps[i - 1], out=alpha[i])
            j = num_words - 1 - i
            np.matmul(steps[j], beta[j + 1], out=beta[j])
            if i % _RESCALE_EVERY == 0:
                alpha[i] /= alpha[i].sum(axis=2, keepdims=True)
            if j % _RESCALE_EVERY == 0:
                # Only on a row's words: the backward pass starts in the padding, and a row's values
                # must not depend on how far its batch is padded (bit-identical beside any batch-mates).
                scale = beta[j].sum(axis=1, keepdims=True)
                scale[~mask[:, j]] = 1.0
                beta[j] /= scale
        marginals = (alpha[:, :, 0, :] * beta[:, :, :, 0]).transpose(1, 0, 2)
        marginals = marginals / marginals.sum(axis=2, keepdims=True)
    marginals[~mask] = 0.0
    finite = np.isfinite(marginals).all(axis=(1, 2))
    if not finite.all():
        bad = ~finite
        marginals[bad] = _log_space_marginals(
            emissions[bad], mask[bad], lengths[bad], transitions, start, end
        )
    return marginals


def _seqeval_tag_and_type(label: str) -> tuple[str, str]:
    """Split a label like seqeval (default, prefix mode): "B-PER" -> ("B", "PER"), "O" or "B" -> (.., "_")."""
    if not label:
        raise ValueError("empty tag")
    return label[0], label[1:].split("-", maxsplit=1)[-1] or "_"


def _ends_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    # seqeval's end_of_chunk, rule for rule.
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _starts_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    # seqeval's start_of_chunk, rule for rule.
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of a tag sequence as ``(type, start_word, end_word_exclusive)``, in order.

    Exactly seqeval's default mode (``seqeval.metrics.sequence_labeling.get_entities``, conlleval-like), so
    that the spans the server returns are the ones the metrics count: an ``I-X`` after ``O``, at the start or
    after another type starts an entity, a type change ends one, and tags without a type ("B", "I") form
    entities of type "_". (seqeval's end is inclusive; here it is exclusive.)
    """
    spans: list[tuple[str, int, int]] = []
    prev_tag, prev_type, begin = "O", "", 0
    # A trailing "O" closes an entity that runs to the end, as in seqeval.
    for i, label in enumerate([*tags, "O"]):
        tag, type_ = _seqeval_tag_and_type(label)
        if _ends_chunk(prev_tag, tag, prev_type, type_):
            spans.append((prev_type, begin, i))
        if _starts_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return spans


def char_spans(
    spans: Sequence[tuple[str, int, int]], word_offsets: Sequence[tuple[int, int]]
) -> list[tuple[str, int, int]]:
    """Map word spans ``(type, start_word, end_word_exclusive)`` to character spans ``(type, start, end)``.

    ``word_offsets[i]`` is word i's ``(start_char, end_char)`` in the text (as ``split_words`` gives); a
    span runs from its first word's start to its last word's end.
    """
    result = []
    for type_, start_word, end_word in spans:
        if not 0 <= start_word < end_word <= len(word_offsets):
            raise ValueError(f"word span [{start_word}, {end_word}) outside the {len(word_offsets)} words")
        result.append((type_, word_offsets[start_word][0], word_offsets[end_word - 1][1]))
    return result
