"""Deep & Cross Network."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import CTRModel
from .layers import MLP, CrossNetwork


class DCN(CTRModel):
    """DCN: a cross network and an MLP (no output layer) in parallel on the flattened embeddings, combined by a
    linear layer over their concatenation. ``mlp_dims=()`` leaves the cross network alone."""

    name = "dcn"

    def __init__(self, feature_map, embedding, mlp_dims: Sequence[int] = (1024, 512, 256), dropout: float = 0.0,
                 batch_norm: bool = True, cross_layers: int = 6):
        super().__init__(feature_map, embedding)
        input_dim = self.num_fields * self.embed_dim
        self.cross = CrossNetwork(input_dim, cross_layers)
        self.mlp = MLP(input_dim, mlp_dims, dropout=dropout, batch_norm=batch_norm, output_layer=False)
        deep_dim = self.mlp.output_dim if len(self.mlp.mlp) else 0
        self.combine = nn.Linear(input_dim + deep_dim, 1)

    def logits(self, emb, ids):
        x0 = emb.flatten(1)
        parts = [self.cross(x0)]
        if len(self.mlp.mlp):
            parts.append(self.mlp(x0))
        return self.combine(torch.cat(parts, dim=1)).squeeze(1)
