"""Batched CRF inference in PyTorch: Viterbi tags and per-word marginals, on any device.

The twin of ``model.decoding``'s numpy ``viterbi_decode`` and ``crf_marginals`` (same CRF
convention, pytorch-crf's), for the GPU runtime: everything stays on the device, there is no
host synchronisation and no data-dependent shape, so the whole decode is captured in the same
CUDA graph as the model. Loops run over word positions only, never over examples. Tested equal
to the numpy functions (which are tested against brute force and pytorch-crf).
"""

from __future__ import annotations

import torch

__all__ = ["CRFDecoder"]


class CRFDecoder(torch.nn.Module):
    """``forward(emissions (B, W, T), mask (B, W))`` -> (tags (B, W) int64, confidence (B, W) float32).

    ``tags`` is each row's Viterbi path (0 on padding); ``confidence`` the marginal probability of
    the chosen tag at each word, P(y_i = tags_i | x) (0 on padding). Masks are contiguous prefixes
    (``collate``'s ``word_mask``); every row needs its first word (a padding row of a CUDA graph
    bucket has one dummy word).
    """

    def __init__(
        self, transitions: torch.Tensor, start_transitions: torch.Tensor, end_transitions: torch.Tensor
    ):
        super().__init__()
        self.register_buffer("transitions", transitions.float().clone())
        self.register_buffer("start_transitions", start_transitions.float().clone())
        self.register_buffer("end_transitions", end_transitions.float().clone())

    def forward(self, emissions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emissions = emissions.float()
        mask = mask.bool()
        tags = self.viterbi(emissions, mask)
        marginals = self.marginals(emissions, mask)
        confidence = marginals.gather(2, tags.unsqueeze(-1)).squeeze(-1) * mask
        return tags, confidence

    def viterbi(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _, num_words, _ = emissions.shape
        score = self.start_transitions + emissions[:, 0]  # (B, T): best path ending in each tag
        backpointers = []  # [i - 1][b, j]: best previous tag when row b is at tag j at word i
        for i in range(1, num_words):
            candidates = score.unsqueeze(2) + self.transitions + emissions[:, i].unsqueeze(1)  # (B, from, to)
            best, previous = candidates.max(dim=1)
            backpointers.append(previous)
            score = torch.where(mask[:, i].unsqueeze(1), best, score)  # padding keeps the last word's score
        last_tags = (score + self.end_transitions).argmax(dim=1)  # (B,)
        lengths = mask.sum(dim=1)
        tags = torch.zeros_like(mask, dtype=torch.long)
        current = last_tags
        for i in range(num_words - 1, -1, -1):
            inside = i <= lengths - 1
            tags[:, i] = torch.where(inside, current, 0)
            if i > 0:
                followed = backpointers[i - 1].gather(1, current.unsqueeze(1)).squeeze(1)
                # Before a row's last word, follow its backpointers; past it, wait at the best last tag.
                current = torch.where(inside, followed, last_tags)
        return tags

    def marginals(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """P(y_i = t | x) by forward-backward in log space: (B, W, T), rows summing to 1 on real words."""
        _, num_words, _ = emissions.shape
        alphas = [self.start_transitions + emissions[:, 0]]
        for i in range(1, num_words):
            step = torch.logsumexp(alphas[-1].unsqueeze(2) + self.transitions, dim=1) + emissions[:, i]
            alphas.append(torch.where(mask[:, i].unsqueeze(1), step, alphas[-1]))
        # beta at a row's last word is the end score; padding positions carry it backwards.
        betas = [self.end_transitions.expand_as(alphas[0])]
        for i in range(num_words - 2, -1, -1):
            step = torch.logsumexp(self.transitions + (emissions[:, i + 1] + betas[-1]).unsqueeze(1), dim=2)
            betas.append(torch.where(mask[:, i + 1].unsqueeze(1), step, betas[-1]))
        alpha = torch.stack(alphas, dim=1)
        beta = torch.stack(betas[::-1], dim=1)
        log_partition = torch.logsumexp(alphas[-1] + self.end_transitions, dim=1)  # (B,)
        marginals = torch.exp(alpha + beta - log_partition[:, None, None])
        return marginals * mask.unsqueeze(2)
