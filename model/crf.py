"""The project's one torch CRF: pytorch-crf's (training) plus batched Viterbi and marginals (GPU runtime).

``CRF`` subclasses ``torchcrf.CRF`` (pytorch-crf), so training keeps its negative log-likelihood
(``forward(emissions, tags, mask, reduction)``) and its parameters ``transitions``,
``start_transitions`` and ``end_transitions``: checkpoints (``head.crf.transitions``, ...) load
as they are. It adds ``viterbi``, ``marginals`` and ``decode_batch`` (tags and per-word
confidence), which stay on the device with no host synchronisation and no data-dependent shape,
so the GPU runtime (``engine.runtimes.pytorch``) captures the whole decode in the same CUDA
graph as the model. Loops run over word positions only, never over examples.

``model.decoding``'s ``viterbi_decode`` and ``crf_marginals`` are the numpy twin (same CRF
convention) for the torch-free ONNX server; tests hold the two equal, and both equal to
pytorch-crf's own ``decode`` and to brute force.
"""

from __future__ import annotations

import torch
import torchcrf

__all__ = ["CRF"]


class CRF(torchcrf.CRF):
    """pytorch-crf's linear-chain CRF (likelihood, ``decode``) with batched, graph-capturable inference.

    Built like pytorch-crf's (``CRF(num_tags, batch_first=True)`` in the NER head), or from given
    scores with ``from_scores`` (the GPU runtime). The batched methods take ``emissions`` (B, W, T)
    and ``mask`` (B, W), or (W, B, T) and (W, B) when ``batch_first`` is False, like the rest of
    pytorch-crf. Masks are contiguous prefixes (``collate``'s ``word_mask``) and every row needs
    its first word (a padding row of a CUDA graph bucket has one dummy word); neither is checked,
    as checking would synchronise with the device.
    """

    @classmethod
    def from_scores(
        cls,
        transitions: torch.Tensor,
        start_transitions: torch.Tensor,
        end_transitions: torch.Tensor,
        batch_first: bool = True,
    ) -> CRF:
        """A frozen float32 CRF holding given scores (a bundle's ``crf`` arrays), for inference."""
        crf = cls(transitions.shape[-1], batch_first=batch_first)
        with torch.no_grad():
            crf.transitions.copy_(transitions)
            crf.start_transitions.copy_(start_transitions)
            crf.end_transitions.copy_(end_transitions)
        return crf.requires_grad_(False)

    def _batched(
        self, emissions: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-first emissions in the wider of their and the CRF's dtype; a bool mask (None: all words)."""
        if emissions.dim() != 3 or emissions.size(2) != self.num_tags:
            raise ValueError(
                f"emissions must be 3-d with {self.num_tags} tags, got shape {tuple(emissions.shape)}"
            )
        if not self.batch_first:
            emissions = emissions.transpose(0, 1)
            mask = None if mask is None else mask.transpose(0, 1)
        if mask is None:
            mask = emissions.new_ones(emissions.shape[:2], dtype=torch.bool)
        if mask.shape != emissions.shape[:2]:
            raise ValueError(f"mask must have shape {tuple(emissions.shape[:2])}, got {tuple(mask.shape)}")
        return emissions.to(torch.promote_types(emissions.dtype, self.transitions.dtype)), mask.bool()

    def _layout(self, batch_first: torch.Tensor) -> torch.Tensor:
        """A batch-first result in the CRF's layout."""
        return batch_first if self.batch_first else batch_first.transpose(0, 1)

    def decode_batch(
        self, emissions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tags int64, confidence): each row's Viterbi path and P(y_i = tags_i | x) per word, 0 on padding.

        Both have the mask's shape; confidence is float32 for float32 scores (``from_scores``) and
        float16 or float32 emissions.
        """
        emissions, mask = self._batched(emissions, mask)
        tags = self._viterbi(emissions, mask)
        marginals = self._marginals(emissions, mask)
        confidence = marginals.gather(2, tags.unsqueeze(-1)).squeeze(-1) * mask
        return self._layout(tags), self._layout(confidence)

    def viterbi(self, emissions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The best tag sequence of each row as an int64 tensor of the mask's shape, 0 on padding.

        On each row's words it equals ``decode`` (pytorch-crf's, which returns Python lists).
        """
        return self._layout(self._viterbi(*self._batched(emissions, mask)))

    def marginals(self, emissions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """P(y_i = t | x) by forward-backward in log space, shaped like ``emissions``.

        Sums to 1 over the tags at each real word; 0 on padding.
        """
        return self._layout(self._marginals(*self._batched(emissions, mask)))

    def log_marginals(self, emissions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log P(y_i = t | x), shaped like ``emissions`` and differentiable (distillation's student side).

        Computed in log space, so a tag the CRF all but rules out keeps a finite log-probability
        instead of log(0); padding positions hold 0 (not a distribution: callers mask them).
        """
        emissions, mask = self._batched(emissions, mask)
        return self._layout(self._log_marginals(emissions, mask) * mask.unsqueeze(2))

    def _viterbi(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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

    def _marginals(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._log_marginals(emissions, mask)) * mask.unsqueeze(2)

    def _log_marginals(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Forward-backward: alpha + beta - log Z at every position (padding positions hold junk)."""
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
        return alpha + beta - log_partition[:, None, None]
