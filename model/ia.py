"""Insert-Activation (paper section 3.3, eqs. 15-21).

An FFN is a key-value memory, ``FFN(h) = f(h K^T) V`` (eq. 15). IA gives every text token one
extra key/value slot holding the visual knowledge selected for it:

    S = h^t (h^v)^T                      similarity of each token to each visual vector (eq. 16)
    k_i = softmax(S_i) h^v               the token's selected visual vector (eqs. 17-18)
    FFN'(h_i) = f([h_i K^T, h_i . phi_k(k_i)]) [V; phi_v(k_i)]      (eq. 21)

so the extra slot adds ``f(h_i . phi_k(k_i)) * phi_v(k_i)`` to the usual output.

Choices where the paper is silent (configurable in ``IMMConfig``):
- ``ia_scale``: S is divided by sqrt(d) like attention logits; unscaled dot products of
  LayerNormed 768-d vectors saturate the softmax into a hard argmax.
- ``ia_top_k``: the softmax runs over all visual vectors (None) or only the k most similar.
- ``phi_v`` starts at zero, so a freshly built model equals its text backbone exactly and the
  visual knowledge is learned in, rather than starting as noise in pretrained features.
- The visual vectors are the visual stream's FFN inputs of the same block, [CLS] included.
- An example without an image gets no extra slot: IA reduces exactly to the plain FFN.
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
        return self.key_projection(selected), self.value_projection(selected)


class ActivationFFN(FeedForward):
    """The text FFN with one inserted key/value slot per token (eq. 21)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        inserted_key: torch.Tensor | None = None,
        inserted_value: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        output = super().forward(hidden_states)
        if inserted_key is None:
            return output
        slot = self.activation((hidden_states * inserted_key).sum(dim=-1, keepdim=True)) * inserted_value
        # Examples without an image add nothing: exactly the plain FFN.
        return output + slot * has_image[:, None, None].to(slot.dtype)


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
        has_image: torch.Tensor,
        picture_row: torch.Tensor | None = None,
        compute_visual: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``picture_row`` (separate streams): which picture each example's text selects from
        (see ``rows_of_pictures``); None when ``visual`` already has one row per example."""
        text, visual = self.attend(text, text_bias, visual, visual_bias)
        if self.selector is not None:
            own_visual = visual if picture_row is None else rows_of_pictures(visual, picture_row)
            key, value = self.selector(text, own_visual)
            text_out = self.feed_forward(self.text_ffn, text, key, value, has_image)
        else:
            text_out = self.feed_forward(self.text_ffn, text)
        # The last block's visual output feeds nothing: skip it (and keep it out of the ONNX graph).
        visual_out = self.feed_forward(self.visual_ffn, visual) if compute_visual else None
        return text_out, visual_out
