"""Building blocks shared by the CTR models. Every block works on a flat batch ``(B, ...)``."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _dims(name: str, dims) -> tuple[int, ...]:
    if dims is None:
        return ()
    if isinstance(dims, int) or not isinstance(dims, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {dims!r}")
    out = tuple(dims)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in out):
        raise ValueError(f"{name} must be a sequence of positive ints, got {dims!r}")
    return out


class MLP(nn.Module):
    """``[Linear -> BatchNorm1d -> ReLU -> Dropout] * len(hidden_dims)`` (+ ``Linear(., 1)`` if ``output_layer``).

    The layer order and the batch norm follow the OptEmbed reference code's ``MultiLayerPerceptron``.
    """

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (1024, 512, 256), dropout: float = 0.0,
                 batch_norm: bool = True, output_layer: bool = True):
        super().__init__()
        hidden_dims = _dims("mlp_dims", hidden_dims)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        dim = int(input_dim)
        for h in hidden_dims:
            layers.append(nn.Linear(dim, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(p=float(dropout)))
            dim = h
        if output_layer:
            layers.append(nn.Linear(dim, 1))
            dim = 1
        self.output_dim = dim
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, input_dim) -> (B, output_dim)."""
        return self.mlp(x)


class FeaturesLinear(nn.Module):
    """First-order term ``sum_f w[id_f] + b`` over the global ids (its own ``(N, 1)`` table, zero-initialised)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(int(num_features), 1))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (B, F) -> (B,)."""
        return nn.functional.embedding(ids, self.weight).sum(dim=(1, 2)) + self.bias


def fm_interaction(emb: torch.Tensor) -> torch.Tensor:
    """Second-order FM term ``sum_{i<j} <e_i, e_j>`` computed as ``0.5 * sum((sum e)^2 - sum e^2)``: (B, F, D) -> (B,)."""
    square_of_sum = emb.sum(dim=1).pow(2)
    sum_of_square = emb.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


class CrossNetwork(nn.Module):
    """DCN cross layers ``x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l`` on the flattened embeddings."""

    def __init__(self, input_dim: int, num_layers: int):
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"cross_layers must be a non-negative int, got {num_layers!r}")
        self.w = nn.ModuleList([nn.Linear(input_dim, 1, bias=False) for _ in range(num_layers)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(input_dim)) for _ in range(num_layers)])

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """``x0`` (B, input_dim) -> (B, input_dim)."""
        x = x0
        for w, b in zip(self.w, self.b):
            x = x0 * w(x) + b + x
        return x


class InnerProduct(nn.Module):
    """Pairwise inner products ``<e_i, e_j>`` for all ``i < j``: (B, F, D) -> (B, F(F-1)/2)."""

    def __init__(self, num_fields: int):
        super().__init__()
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.output_dim = int(rows.numel())

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb[:, self.rows] * emb[:, self.cols]).sum(dim=-1)


class MultiHeadSelfAttention(nn.Module):
    """AutoInt interacting layer: multi-head self-attention over fields, residual projection, ReLU.

    (B, F, input_dim) -> (B, F, num_heads * attention_dim).
    """

    def __init__(self, input_dim: int, attention_dim: int, num_heads: int, residual: bool = True,
                 use_scale: bool = False):
        super().__init__()
        if num_heads < 1 or attention_dim < 1:
            raise ValueError(f"num_heads and attention_dim must be >= 1, got {num_heads}, {attention_dim}")
        out_dim = attention_dim * num_heads
        self.num_heads = num_heads
        self.attention_dim = attention_dim
        self.use_scale = use_scale
        self.w_q = nn.Linear(input_dim, out_dim, bias=False)
        self.w_k = nn.Linear(input_dim, out_dim, bias=False)
        self.w_v = nn.Linear(input_dim, out_dim, bias=False)
        self.w_res = nn.Linear(input_dim, out_dim, bias=False) if residual else None
        self.output_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, _ = x.shape
        h, d = self.num_heads, self.attention_dim

        def split(t):  # (B, F, H*d) -> (B, H, F, d)
            return t.view(b, f, h, d).transpose(1, 2)

        q, k, v = split(self.w_q(x)), split(self.w_k(x)), split(self.w_v(x))
        scores = q @ k.transpose(-1, -2)
        if self.use_scale:
            scores = scores / d ** 0.5
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, f, h * d)
        if self.w_res is not None:
            out = out + self.w_res(x)
        return torch.relu(out)
