"""Implicit Semantic Alignment blocks (paper section 3.2.2, eqs. 3-4).

An ISA block is a BERT layer whose attention and LayerNorms are shared by the text and the
visual streams while each stream has its own feed-forward network (T-FFN: the backbone's;
V-FFN: initialised as a copy of it).

LayerNorm placement: the paper writes eqs. 3-4 in pre-LN form, but the backbone (BERT) is
post-LN and its pretrained weights only make sense that way, so the blocks keep BERT's
``LN(x + Sublayer(x))``. Both LayerNorms are shared between the modalities.

Attention runs within each stream by default (``attention_mode="separate"``): text attends
to text and patches to patches, with shared projection weights. That keeps the sentence
vectors of the two modalities independent, which the in-batch matching of the SW loss needs
(a text that could see its own image would trivially match it). ``"joint"`` attends over the
concatenated sequence instead; examples without an image then see no visual keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import IMMConfig

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) keep-mask to an additive (B, 1, 1, L) bias: 0 where kept, a large negative where masked."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class SharedAttention(nn.Module):
    """BERT's self-attention with its output projection, residual and LayerNorm (post-LN)."""

    def __init__(self, config: IMMConfig):
        super().__init__()
        backbone = config.backbone_config
        hidden = backbone.hidden_size
        if hidden % backbone.num_attention_heads:
            raise ValueError(
                f"hidden size {hidden} is not a multiple of {backbone.num_attention_heads} heads"
            )
        self.num_heads = backbone.num_attention_heads
        self.head_size = hidden // self.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=backbone.layer_norm_eps)
        self.attention_dropout = backbone.attention_probs_dropout_prob
        self.dropout = nn.Dropout(backbone.hidden_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        context = F.scaled_dot_product_attention(
            self._heads(self.query(hidden_states)),
            self._heads(self.key(hidden_states)),
            self._heads(self.value(hidden_states)),
            attn_mask=bias,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        # An explicit shape, not flatten: the visual stream may have 0 rows, where ONNX Runtime
        # cannot infer a -1 axis.
        context = context.transpose(1, 2).reshape(hidden_states.shape)
        return self.LayerNorm(hidden_states + self.dropout(self.output(context)))


class FeedForward(nn.Module):
    """A modality's FFN, ``down(f(up(h)))`` (eq. 15 with biases); the residual and LN are the block's."""

    def __init__(self, config: IMMConfig):
        super().__init__()
        backbone = config.backbone_config
        self.up = nn.Linear(backbone.hidden_size, backbone.intermediate_size)
        self.activation = activation(backbone.hidden_act)
        self.down = nn.Linear(backbone.intermediate_size, backbone.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(hidden_states)))


class ISALayer(nn.Module):
    """One ISA block: shared attention and LayerNorms, modality-specific FFNs."""

    def __init__(self, config: IMMConfig):
        super().__init__()
        self.joint = config.attention_mode == "joint"
        self.attention = SharedAttention(config)
        self.text_ffn = FeedForward(config)
        self.visual_ffn = FeedForward(config)
        self.output_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.backbone_config.layer_norm_eps)
        self.dropout = nn.Dropout(config.backbone_config.hidden_dropout_prob)

    def attend(
        self,
        text: torch.Tensor,
        text_bias: torch.Tensor,
        visual: torch.Tensor,
        visual_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.joint:
            return self.attention(text, text_bias), self.attention(visual, visual_bias)
        joint = self.attention(torch.cat([text, visual], dim=1), torch.cat([text_bias, visual_bias], dim=-1))
        return joint[:, : text.shape[1]], joint[:, text.shape[1] :]

    def feed_forward(self, ffn: nn.Module, hidden_states: torch.Tensor, *args) -> torch.Tensor:
        return self.output_LayerNorm(hidden_states + self.dropout(ffn(hidden_states, *args)))

    def forward(
        self,
        text: torch.Tensor,
        text_bias: torch.Tensor,
        visual: torch.Tensor,
        visual_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text, visual = self.attend(text, text_bias, visual, visual_bias)
        return self.feed_forward(self.text_ffn, text), self.feed_forward(self.visual_ffn, visual)

    def text_only(self, text: torch.Tensor, text_bias: torch.Tensor) -> torch.Tensor:
        """The text stream alone: what ``forward`` gives the text when no example has an image."""
        return self.feed_forward(self.text_ffn, self.attention(text, text_bias))
