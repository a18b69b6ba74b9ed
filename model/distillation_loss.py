"""The distillation loss: a student learns an ensemble teacher's soft targets (``model.distillation``).

NER: at every real word, KL(teacher marginals || student CRF marginals), where the student's
marginals P(y_i = t | x) come from its own CRF by forward-backward in log space
(``CRF.log_marginals``), so the gradient reaches both the emissions and the transition scores.
The per-word KLs are summed over each sentence's words and averaged over the sentences, the scale
of the CRF's gold loss (a whole sentence's negative log-likelihood, averaged over the batch): with
a per-word mean the distillation term was about 1 % of the loss at ``--distill-weight 0.5``.

RE: KL(teacher probabilities || softmax(student logits)) per example, averaged over the examples.

Each example may carry a weight (the teacher's confidence for an unlabelled example; 1 for a
labelled one): a word's (or example's) KL is multiplied by its example's weight, and the mean is
still taken over the sentences (examples), so a low-confidence example pulls less without
rescaling the others.
"""

from __future__ import annotations

import math

import torch

from model.crf import CRF

# log(1e-12): logs are clamped here so that a zero probability (a teacher sure of a tag, a student
# that all but rules one out) gives a finite term, never inf * 0 = nan.
LOG_FLOOR = math.log(1e-12)


def kl_divergence(teacher: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the last dimension: ``sum_t p_t (log p_t - log q_t)``, 0 where p_t = 0."""
    teacher = teacher.float()
    teacher_log = torch.log(teacher.clamp_min(1e-12)).clamp_min(LOG_FLOOR)
    student_log = student_log_probs.float().clamp_min(LOG_FLOOR)
    return torch.where(teacher > 0, teacher * (teacher_log - student_log), 0.0).sum(dim=-1)


def _example_weights(weights: torch.Tensor | None, rows: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return like.new_ones(rows)
    if weights.shape != (rows,):
        raise ValueError(
            f"weights must have one value per example ({rows}), got shape {tuple(weights.shape)}"
        )
    return weights.to(like.dtype)


def ner_distillation_loss(
    emissions: torch.Tensor,
    crf: CRF,
    word_mask: torch.Tensor,
    teacher_marginals: torch.Tensor,
    target_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the sentences of the sum over their target words of KL(teacher marginals || the
    student CRF's marginals).

    ``emissions`` (B, W, T) and ``word_mask`` (B, W) are the student's; ``teacher_marginals``
    (B, W, T) the targets; ``target_mask`` (B, W) the words that have a target (default: every
    real word; a student may keep more words than its teachers did); ``weights`` (B,) per example.
    0 (still differentiable) when no word has a target.
    """
    if teacher_marginals.shape != emissions.shape:
        raise ValueError(
            f"teacher marginals of shape {tuple(teacher_marginals.shape)} do not match the emissions' "
            f"{tuple(emissions.shape)}"
        )
    words = word_mask.bool() if target_mask is None else target_mask.bool() & word_mask.bool()
    student_log = crf.log_marginals(emissions.float(), word_mask)
    per_word = kl_divergence(teacher_marginals, student_log)  # (B, W)
    weight = _example_weights(weights, emissions.shape[0], per_word)[:, None] * words
    sentences = words.any(dim=1).sum().clamp_min(1)
    return (per_word * weight).sum() / sentences


def re_distillation_loss(
    logits: torch.Tensor, teacher_probabilities: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the examples of KL(teacher probabilities || softmax(logits)); ``weights`` (B,) per example."""
    if teacher_probabilities.shape != logits.shape:
        raise ValueError(
            f"teacher probabilities of shape {tuple(teacher_probabilities.shape)} do not match the "
            f"logits' {tuple(logits.shape)}"
        )
    per_example = kl_divergence(teacher_probabilities, logits.float().log_softmax(dim=-1))
    weight = _example_weights(weights, logits.shape[0], per_example)
    return (per_example * weight).sum() / max(1, logits.shape[0])
