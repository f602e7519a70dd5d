"""AutoInt (and AutoInt+ with ``use_mlp=True``)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import CTRModel
from .layers import MLP, MultiHeadSelfAttention


class AutoInt(CTRModel):
    """AutoInt: ``attention_layers`` multi-head self-attention layers over the fields with residual connections,
    then a linear layer over the flattened output. With ``use_mlp=True`` (AutoInt+) an MLP over the embeddings is
    added to the logit.

    ``attention_dim`` is the per-head dimension (default ``max(1, embed_dim // num_heads)``).
    """

    name = "autoint"

    def __init__(self, feature_map, embedding, attention_layers: int = 3, num_heads: int = 2,
                 attention_dim: int | None = None, residual: bool = True, use_scale: bool = False,
                 use_mlp: bool = False, mlp_dims: Sequence[int] = (1024, 512, 256), dropout: float = 0.0,
                 batch_norm: bool = True):
        super().__init__(feature_map, embedding)
        if isinstance(attention_layers, bool) or not isinstance(attention_layers, int) or attention_layers < 1:
            raise ValueError(f"attention_layers must be a positive int, got {attention_layers!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if attention_dim is None:
            attention_dim = max(1, self.embed_dim // num_heads)
        layers = []
        dim = self.embed_dim
        for _ in range(attention_layers):
            layer = MultiHeadSelfAttention(dim, attention_dim, num_heads, residual=residual, use_scale=use_scale)
            layers.append(layer)
            dim = layer.output_dim
        self.attention = nn.Sequential(*layers)
        self.output = nn.Linear(self.num_fields * dim, 1)
        self.mlp = MLP(self.num_fields * self.embed_dim, mlp_dims, dropout=dropout,
                       batch_norm=batch_norm) if use_mlp else None

    def logits(self, emb, ids):
        out = self.output(self.attention(emb).flatten(1)).squeeze(1)
        if self.mlp is not None:
            out = out + self.mlp(emb.flatten(1)).squeeze(1)
        return out
