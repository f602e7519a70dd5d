"""FM and DeepFM."""
from __future__ import annotations

from collections.abc import Sequence

from .base import CTRModel
from .layers import MLP, FeaturesLinear, fm_interaction


class FM(CTRModel):
    """Factorization machine: ``b + sum_f w[id_f] + sum_{i<j} <e_i, e_j>``."""

    name = "fm"
    has_linear = True

    def __init__(self, feature_map, embedding):
        super().__init__(feature_map, embedding)
        self.linear = FeaturesLinear(self.num_features)

    def logits(self, emb, ids):
        return self.linear(ids) + fm_interaction(emb)


class DeepFM(CTRModel):
    """DeepFM: FM (first + second order) plus an MLP over the concatenated embeddings."""

    name = "deepfm"
    has_linear = True

    def __init__(self, feature_map, embedding, mlp_dims: Sequence[int] = (1024, 512, 256), dropout: float = 0.0,
                 batch_norm: bool = True):
        super().__init__(feature_map, embedding)
        self.linear = FeaturesLinear(self.num_features)
        self.mlp = MLP(self.num_fields * self.embed_dim, mlp_dims, dropout=dropout, batch_norm=batch_norm)

    def logits(self, emb, ids):
        deep = self.mlp(emb.flatten(1)).squeeze(1)
        return self.linear(ids) + fm_interaction(emb) + deep
