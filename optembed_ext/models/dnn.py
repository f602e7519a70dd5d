"""MLP-based models: FNN, IPNN and Wide&Deep."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import CTRModel
from .layers import MLP, FeaturesLinear, InnerProduct


class FNN(CTRModel):
    """FNN: an MLP over the concatenated field embeddings."""

    name = "fnn"

    def __init__(self, feature_map, embedding, mlp_dims: Sequence[int] = (1024, 512, 256), dropout: float = 0.0,
                 batch_norm: bool = True):
        super().__init__(feature_map, embedding)
        self.mlp = MLP(self.num_fields * self.embed_dim, mlp_dims, dropout=dropout, batch_norm=batch_norm)

    def logits(self, emb, ids):
        return self.mlp(emb.flatten(1)).squeeze(1)


class IPNN(CTRModel):
    """IPNN: an MLP over the concatenated embeddings and all pairwise inner products ``<e_i, e_j>``, ``i < j``."""

    name = "ipnn"

    def __init__(self, feature_map, embedding, mlp_dims: Sequence[int] = (1024, 512, 256), dropout: float = 0.0,
                 batch_norm: bool = True):
        super().__init__(feature_map, embedding)
        self.product = InnerProduct(self.num_fields)
        self.mlp = MLP(self.num_fields * self.embed_dim + self.product.output_dim, mlp_dims, dropout=dropout,
                       batch_norm=batch_norm)

    def logits(self, emb, ids):
        return self.mlp(torch.cat([emb.flatten(1), self.product(emb)], dim=1)).squeeze(1)


class WideDeep(CTRModel):
    """Wide&Deep: a first-order (wide) term over the ids plus an MLP (deep) over the embeddings."""

    name = "wd"
    has_linear = True

    def __init__(self, feature_map, embedding, mlp_dims: Sequence[int] = (1024, 512, 256), dropout: float = 0.0,
                 batch_norm: bool = True):
        super().__init__(feature_map, embedding)
        self.linear = FeaturesLinear(self.num_features)
        self.mlp = MLP(self.num_fields * self.embed_dim, mlp_dims, dropout=dropout, batch_norm=batch_norm)

    def logits(self, emb, ids):
        return self.linear(ids) + self.mlp(emb.flatten(1)).squeeze(1)
