"""Task heads: a CRF tagger over words for NER (paper eqs. 22-23), a [CLS] classifier for RE (eq. 24)."""

from __future__ import annotations

import torch
from torch import nn
from torchcrf import CRF

from model.config import IMMConfig


def gather_positions(hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden_states[b, positions[b, i]]`` for every b, i: (B, L, d) x (B, k) -> (B, k, d)."""
    index = positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
    return torch.gather(hidden_states, 1, index)


class NERHead(nn.Module):
    """Word representations (first sub-token of each word) -> emissions -> linear-chain CRF over BIO tags."""

    def __init__(self, config: IMMConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, len(config.labels))
        self.crf = CRF(len(config.labels), batch_first=True)

    def emissions(self, hidden_states: torch.Tensor, word_index: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(gather_positions(hidden_states, word_index)))

    def loss(self, emissions: torch.Tensor, labels: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of the gold tag sequences (eq. 23)."""
        return -self.crf(emissions.float(), labels, mask=word_mask, reduction="mean")

    def decode(self, emissions: torch.Tensor, word_mask: torch.Tensor) -> list[list[int]]:
        return self.crf.decode(emissions.float(), mask=word_mask)


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
