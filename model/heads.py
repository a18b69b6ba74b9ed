"""Task heads: a CRF tagger over words for NER (paper eqs. 22-23), a [CLS] classifier for RE (eq. 24)."""

from __future__ import annotations

import torch
from torch import nn

from model.config import IMMConfig
from model.crf import CRF
from model.preprocessing.text import WORD_SHAPES


def gather_positions(hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden_states[b, positions[b, i]]`` for every b, i: (B, L, d) x (B, k) -> (B, k, d)."""
    index = positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
    return torch.gather(hidden_states, 1, index)


class NERHead(nn.Module):
    """Word representations (first sub-token of each word) -> emissions -> linear-chain CRF over BIO tags.

    With ``word_shape_size`` > 0 each word's representation also carries a learned embedding of its
    casing class (``model.preprocessing.word_shape``): an uncased backbone cannot tell "Apple" from
    "apple", and capitals are the strongest cue for names in tweets. Not in the paper (its BERT
    reads the case itself); the project's addition for the small uncased default backbone.
    """

    def __init__(self, config: IMMConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.word_shapes = (
            nn.Embedding(len(WORD_SHAPES), config.word_shape_size, padding_idx=0)
            if config.word_shape_size
            else None
        )
        self.classifier = nn.Linear(config.hidden_size + config.word_shape_size, len(config.labels))
        self.crf = CRF(len(config.labels), batch_first=True)

    def emissions(
        self, hidden_states: torch.Tensor, word_index: torch.Tensor, word_shape: torch.Tensor | None = None
    ) -> torch.Tensor:
        words = gather_positions(hidden_states, word_index)
        if self.word_shapes is not None:
            if word_shape is None:
                raise ValueError("this NER model reads word shapes: the batch needs word_shape")
            words = torch.cat([words, self.word_shapes(word_shape).to(words.dtype)], dim=-1)
        return self.classifier(self.dropout(words))

    def loss(self, emissions: torch.Tensor, labels: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of the gold tag sequences (eq. 23)."""
        return -self.crf(emissions.float(), labels, mask=word_mask, reduction="mean")

    def decode(self, emissions: torch.Tensor, word_mask: torch.Tensor) -> list[list[int]]:
        """The Viterbi tag ids of each row's words (as pytorch-crf's ``decode``), batched on the device."""
        tags = self.crf.viterbi(emissions.float(), word_mask)
        lengths = word_mask.sum(dim=1)
        return [row[:length] for row, length in zip(tags.tolist(), lengths.tolist(), strict=True)]


class REHead(nn.Module):
    """Relation logits from the [CLS] state (eq. 24), or from the head and tail start markers (MTB's choice)."""

    def __init__(self, config: IMMConfig):
        super().__init__()
        self.pooling = config.re_pooling
        width = config.hidden_size * (2 if self.pooling == "entity_start" else 1)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(width, len(config.labels))

    def forward(self, hidden_states: torch.Tensor, marker_index: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = hidden_states[:, 0]
        else:
            if marker_index is None:
                raise ValueError("re_pooling='entity_start' needs marker_index")
            pooled = gather_positions(hidden_states, marker_index).flatten(1)
        return self.classifier(self.dropout(pooled))
