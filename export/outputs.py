"""A bundle's graph outputs, decoded: the one torch-free decoding that the ONNX Runtime runtime, the
export's parity checks and bundle evaluation share (the PyTorch runtime computes the same CRF
decoding on its device, ``model.crf``, and hands back the same ``NEROutput``).

NER: per example, the CRF's Viterbi tag for each word and that tag's marginal probability
(forward-backward), in numpy (``model.decoding``). RE: the relation probabilities (softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.bundle import CRF_KEYS
from model.decoding import crf_marginals, viterbi_decode
from model.tasks import task_spec

__all__ = ["NEROutput", "decode_outputs", "decode_tags", "softmax"]


@dataclass
class NEROutput:
    """Per example: the CRF's tag id for each of its words, and that tag's marginal probability."""

    tags: list[np.ndarray]
    confidence: list[np.ndarray]


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def decode_outputs(
    task: str,
    output: np.ndarray,
    word_mask: np.ndarray | None = None,
    crf: dict[str, np.ndarray] | None = None,
    *,
    confidence: bool = True,
) -> NEROutput | np.ndarray:
    """A task with a CRF (``output``: emissions (B, W, T), with the batch's ``word_mask`` and the
    bundle's ``crf``): ``NEROutput`` (``decode_tags``); otherwise (logits (B, R)): relation
    probabilities (B, R), float64."""
    if not task_spec(task).has_crf:
        return softmax(output)
    return decode_tags(output, word_mask, crf, confidence=confidence)


def decode_tags(
    emissions: np.ndarray,
    word_mask: np.ndarray | None,
    crf: dict[str, np.ndarray] | None,
    *,
    confidence: bool = True,
) -> NEROutput:
    """Word emissions (B, W, T) decoded by the CRF: each word's Viterbi tag and, unless
    ``confidence=False`` (then left empty), that tag's marginal probability."""
    if crf is None or word_mask is None:
        raise ValueError("decoding NER emissions needs the word mask and the CRF scores")
    scores = tuple(crf[key] for key in CRF_KEYS)
    tags = [np.asarray(path, dtype=np.int64) for path in viterbi_decode(emissions, word_mask, *scores)]
    if not confidence:
        return NEROutput(tags, [])
    marginals = crf_marginals(emissions, word_mask, *scores)
    return NEROutput(tags, [marginals[row, np.arange(len(path)), path] for row, path in enumerate(tags)])
