"""Input embeddings of the two modalities (paper eqs. 1-2)."""

from __future__ import annotations

import torch
from torch import nn

from model.config import IMMConfig


class TextEmbeddings(nn.Module):
    """The backbone's own embeddings (eq. 1): word + position + token type, LayerNorm, dropout."""

    def __init__(self, config: IMMConfig):
        super().__init__()
        backbone = config.backbone_config
        self.word_embeddings = nn.Embedding(
            backbone.vocab_size, backbone.hidden_size, padding_idx=backbone.pad_token_id
        )
        self.position_embeddings = nn.Embedding(backbone.max_position_embeddings, backbone.hidden_size)
        self.token_type_embeddings = nn.Embedding(backbone.type_vocab_size, backbone.hidden_size)
        self.LayerNorm = nn.LayerNorm(backbone.hidden_size, eps=backbone.layer_norm_eps)
        self.dropout = nn.Dropout(backbone.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(embeddings))


class PatchEmbeddings(nn.Module):
    """The detector-free visual input (eq. 2): linear projections of P x P patches, ViT style.

    A strided convolution is exactly a linear map of each flattened patch. A learned visual
    [CLS] is prepended (the sentence-level image vector of the SW loss), then learned position
    and type embeddings are added and the sum is normalised like the text side.
    """

    def __init__(self, config: IMMConfig):
        super().__init__()
        hidden = config.hidden_size
        eps = config.backbone_config.layer_norm_eps
        self.projection = nn.Conv2d(3, hidden, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, hidden))
        self.type_embedding = nn.Parameter(torch.zeros(1, 1, hidden))
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(config.backbone_config.hidden_dropout_prob)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        nn.init.trunc_normal_(self.type_embedding, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        projected = self.projection(pixel_values)  # (N, d, h, w); N may be 0
        # reshape with the -1 on N, not flatten: ONNX Runtime cannot infer a -1 axis next to a 0.
        patches = projected.reshape(-1, projected.shape[1], projected.shape[2] * projected.shape[3])
        patches = patches.transpose(1, 2)  # (N, m, d)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        embeddings = torch.cat([cls, patches], dim=1) + self.position_embeddings + self.type_embedding
        return self.dropout(self.LayerNorm(embeddings))
