"""Insert-Activation (paper section 3.3, eqs. 15-21).

An FFN is a key-value memory, ``FFN(h) = f(h K^T) V`` (eq. 15). IA inserts visual knowledge
into the text FFN as extra key/value slots:

    S = h^t (h^v)^T                      similarity of each token to each visual vector (eq. 16)
    k_i = softmax(S_i) h^v               token i's selected visual vector (eq. 17)
    k^v = [k_1; ...; k_n]                the n selected vectors of the example's text (eq. 18)
    FFN'(h_i) = f(h_i [phi_k(.) : K]^T) [phi_v(.) : V]                          (eq. 21)

Eq. 21 reads two ways (``IMMConfig.ia_slots``):

- ``"token"``: token i gets ONE private slot, its own selection: the FFN adds
  ``f(h_i . phi_k(k_i)) phi_v(k_i)``. Cost O(n d).
- ``"all"``: the n selected vectors of the example are all inserted into the block's FFN, as
  Kformer inserts its knowledge vectors, and every token activates every slot: the FFN adds
  ``sum_j f(h_i . phi_k(k_j)) phi_v(k_j)`` over the example's non-padding tokens j. "All n
  selected vectors" is eq. 18 taken literally: n is the text length (the paper's notation),
  the slots are the per-token selections k_1..k_n, not the m+1 raw visual vectors (inserting
  those would skip the selection of eqs. 16-17, the paper's filter against irrelevant
  regions) and not a top-k of them (``ia_top_k`` already narrows each selection). Cost O(n^2 d),
  a few per cent of the FFN's O(n d d_m) at tweet lengths. The "token" reading is the special
  case where token i's activations of the other tokens' slots are zero.

docs/architecture.md compares the two (F1 with and without pictures, speed).

Choices where the paper is silent (configurable in ``IMMConfig``):
- ``ia_scale``: S is divided by sqrt(d) like attention logits; unscaled dot products of
  LayerNormed 768-d vectors saturate the softmax into a hard argmax.
- ``ia_key_scale``: phi_k is parametrised as ``W_k k / sqrt(d)`` (+ bias). The same functions as
  an unscaled phi_k, but under Adam the slot scores ``h . phi_k(k)`` then move sqrt(d) times
  slower than phi_v and the patch projection learn. Unscaled, a new-module learning rate of 1e-3
  drove the scores of the tokens that needed the picture to about -55 within one epoch, where
  GELU and its gradient are 0: the slots died and the visual path was never learned
  (docs/training.md has the measurements).
- ``ia_top_k``: the softmax runs over all visual vectors (None) or only the k most similar.
- ``phi_v`` starts at zero, so a freshly built model equals its text backbone exactly and the
  visual knowledge is learned in, rather than starting as noise in pretrained features.
- The visual vectors are the visual stream's FFN inputs of the same block, [CLS] included.
- An example without an image gets no inserted slot, and padding tokens hold none: IA then
  reduces exactly to the plain FFN (the slots' activations are zeroed, not just made small).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import IMMConfig
from model.isa import FeedForward, ISALayer


def rows_of_pictures(visual: torch.Tensor, picture_row: torch.Tensor) -> torch.Tensor:
    """(N, m + 1, d) states of N pictures to (B, m + 1, d) per example: row r gets picture ``picture_row[r] - 1``.

    ``picture_row`` is 0 for an example without a picture, which gets zeros (the caller masks
    them); a zero row in front makes that a plain gather, also when N is 0.
    """
    padded = torch.cat([visual.new_zeros(1, *visual.shape[1:]), visual], dim=0)
    return padded[picture_row]


class VisualKnowledgeSelector(nn.Module):
    """Eqs. 16-20: per text token, the similarity-weighted visual vector, projected to a key and a value."""

    def __init__(self, config: IMMConfig):
        super().__init__()
        hidden = config.hidden_size
        self.scale = 1.0 / math.sqrt(hidden) if config.ia_scale else 1.0
        self.key_scale = 1.0 / math.sqrt(hidden) if config.ia_key_scale else 1.0
        self.top_k = config.ia_top_k
        self.key_projection = nn.Linear(hidden, hidden)  # phi_k
        self.value_projection = nn.Linear(hidden, hidden)  # phi_v
        nn.init.zeros_(self.value_projection.weight)
        nn.init.zeros_(self.value_projection.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        similarity = torch.matmul(text, visual.transpose(1, 2)) * self.scale  # (B, n, m)
        if self.top_k is not None and self.top_k < similarity.shape[-1]:
            threshold = similarity.topk(self.top_k, dim=-1).values[..., -1:]
            similarity = similarity.masked_fill(similarity < threshold, torch.finfo(similarity.dtype).min)
        selected = torch.matmul(similarity.softmax(dim=-1), visual)  # (B, n, d)
        return self.key_projection(selected) * self.key_scale, self.value_projection(selected)


class ActivationFFN(FeedForward):
    """The text FFN with the inserted key/value slots of eq. 21: one per token (``ia_slots="token"``),
    or the example's n slots shared by all its tokens (``"all"``)."""

    def __init__(self, config: IMMConfig):
        super().__init__(config)
        self.all_slots = config.ia_slots == "all"

    def forward(
        self,
        hidden_states: torch.Tensor,
        inserted_key: torch.Tensor | None = None,
        inserted_value: torch.Tensor | None = None,
        slot_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``inserted_key``/``inserted_value`` (B, n, d): slot j of each example (the selection of its
        token j); ``slot_mask`` (B, n) bool: the slots that exist (a token of an example with a picture)."""
        output = super().forward(hidden_states)
        if inserted_key is None:
            return output
        if self.all_slots:
            scores = torch.matmul(hidden_states, inserted_key.transpose(1, 2))  # (B, n tokens, n slots)
            # Zeroed, not merely small: a missing slot adds nothing, exactly.
            activations = self.activation(scores).masked_fill(~slot_mask[:, None, :], 0.0)
            return output + torch.matmul(activations, inserted_value)
        scores = (hidden_states * inserted_key).sum(dim=-1, keepdim=True)  # (B, n, 1): its own slot
        activations = self.activation(scores).masked_fill(~slot_mask[..., None], 0.0)
        return output + activations * inserted_value


class IALayer(ISALayer):
    """An ISA block whose text FFN receives the visual knowledge selected from the same block's visual stream."""

    def __init__(self, config: IMMConfig):
        super().__init__(config)
        self.text_ffn = ActivationFFN(config)
        self.selector = VisualKnowledgeSelector(config) if config.use_ia else None

    def forward(
        self,
        text: torch.Tensor,
        text_bias: torch.Tensor,
        visual: torch.Tensor,
        visual_bias: torch.Tensor | None,
        slot_mask: torch.Tensor,
        picture_row: torch.Tensor | None = None,
        compute_visual: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``slot_mask`` (B, n) bool: the text tokens that hold an inserted slot (real tokens of an
        example with a picture). ``picture_row`` (separate streams): which picture each example's
        text selects from (see ``rows_of_pictures``); None when ``visual`` already has one row per
        example."""
        text, visual = self.attend(text, text_bias, visual, visual_bias)
        if self.selector is not None:
            own_visual = visual if picture_row is None else rows_of_pictures(visual, picture_row)
            key, value = self.selector(text, own_visual)
            text_out = self.feed_forward(self.text_ffn, text, key, value, slot_mask)
        else:
            text_out = self.feed_forward(self.text_ffn, text)
        # The last block's visual output feeds nothing: skip it (and keep it out of the ONNX graph).
        visual_out = self.feed_forward(self.visual_ffn, visual) if compute_visual else None
        return text_out, visual_out
