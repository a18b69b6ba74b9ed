"""The Semantic-Wise (SW) alignment loss (paper eqs. 5-14), guided by a CLIP teacher.

The teacher scores every text against every image of the batch, ``P = max(0, cos(T_c, V_c))``
(eq. 5), and each row of P, normalised, is a soft "true" matching distribution q (eq. 8). The
student's matching distribution p is the softmax of the similarities of its own text and
image vectors (eq. 7); the loss is KL(p || q) averaged over the batch (eq. 6), in both
directions (eq. 12), at sentence level and at word level with the same targets (eqs. 9-13).

Choices where the paper leaves a gap (see docs/architecture.md):
- Sentence level: the text [CLS] and the visual [CLS] after the last ISA block.
- Word level: the mean of the words' (first sub-token) states against the mean of the patch
  states of an augmented view of the image (random crop and flip), both after the last ISA
  block. q^w = q^s (eq. 11).
- Similarity: cosine over a temperature (``sw_temperature``); ``None`` gives the paper's raw
  dot product, which saturates the softmax for 384/768-d states.
- The v2t direction uses P transposed. A row whose teacher mass is zero (all cosines <= 0)
  carries no target and is left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def teacher_targets(text_embeddings: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``P[i, j] = max(0, cos(T_c[i], V_c[j]))`` over the batch."""
    similarity = (
        F.normalize(text_embeddings.float(), dim=-1) @ F.normalize(image_embeddings.float(), dim=-1).T
    )
    return similarity.clamp_min(0.0)


def matching_kl(logits: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 6: ``(1/B) sum_ij p_ij log(p_ij / (q_ij + eps))``, p = row softmax of logits, q = row-normalised teacher.

    Rows whose teacher mass is zero are skipped; the result is 0 when no row has a target.
    """
    mass = teacher.sum(dim=-1, keepdim=True)
    valid = mass.squeeze(-1) > 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    q = teacher[valid] / mass[valid]
    log_p = logits[valid].float().log_softmax(dim=-1)
    p = log_p.exp()
    return (p * (log_p - torch.log(q + eps))).sum() / valid.sum()


def similarity_logits(text: torch.Tensor, image: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """Eqs. 7 and 10 before the softmax: ``h^t_i . h^v_j`` (cosine over a temperature unless None)."""
    if temperature is None:
        return text @ image.T
    return F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T / temperature


def bidirectional_kl(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eqs. 12-13: the mean of the text-to-image and image-to-text losses."""
    return 0.5 * (matching_kl(logits, teacher) + matching_kl(logits.T, teacher.T))


@dataclass
class SWLossOutput:
    sentence: torch.Tensor  # L_S
    word: torch.Tensor  # L_W
    total: torch.Tensor  # alpha L_S + beta L_W (eq. 14)


def sw_loss(
    text_sentence: torch.Tensor,
    image_sentence: torch.Tensor,
    text_word: torch.Tensor,
    image_word: torch.Tensor,
    teacher: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float | None = 0.07,
) -> SWLossOutput:
    """The SW loss of one batch of image-text pairs; ``teacher`` is P from :func:`teacher_targets`."""
    sentence = bidirectional_kl(similarity_logits(text_sentence, image_sentence, temperature), teacher)
    word = bidirectional_kl(similarity_logits(text_word, image_word, temperature), teacher)
    return SWLossOutput(sentence=sentence, word=word, total=alpha * sentence + beta * word)
