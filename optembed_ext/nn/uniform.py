"""The plain embedding table: every feature gets ``embed_dim`` dimensions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import EmbeddingModule

INITS = ("xavier", "normal")


class UniformEmbedding(EmbeddingModule):
    """One ``(num_features, embed_dim)`` table shared by all fields (global ids).

    Args:
        feature_map: the dataset's feature map.
        embed_dim: embedding dimension ``D``.
        init: ``"xavier"`` (default) -- ``xavier_uniform_`` over the whole ``(N, D)`` table, the initialisation
            of the OptEmbed reference code, so norms are comparable with OptEmbed's thresholds; or ``"normal"`` --
            ``N(0, init_std^2)``, the FuxiCTR default.
        init_std: standard deviation of the ``"normal"`` initialisation (default 1e-4).
        sparse: if True the table gradient is a sparse COO tensor (use with ``sparse_adam``/``adagrad``/``sgd``).
        check_indices: validate ids in ``forward`` (shape, dtype, range); costs one reduction per batch.
    """

    def __init__(self, feature_map, embed_dim: int, init: str = "xavier", init_std: float = 1e-4,
                 sparse: bool = False, check_indices: bool = True):
        super().__init__(feature_map, embed_dim)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be a positive number, got {init_std!r}")
        self.init = init
        self.init_std = float(init_std)
        self.sparse_grad = bool(sparse)
        self.check_indices = bool(check_indices)
        self.weight = nn.Parameter(torch.empty(self.num_features, embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "xavier":
            nn.init.xavier_uniform_(self.weight)
        else:
            nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.global_ids(ids, check_range=self.check_indices)
        return F.embedding(ids, self.weight, sparse=self.sparse_grad)

    def num_params(self) -> int:
        return self.num_features * self.embed_dim

    def memory_bytes(self) -> int:
        return self.num_params() * self.weight.element_size()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", init={self.init!r}, sparse={self.sparse_grad}"
