"""AutoField: field-level feature selection with Gumbel gates (Wang et al., WWW 2022).

Search stage (:class:`AutoFieldEmbedding`): a full ``(N, D)`` table whose field embeddings are scaled by a
per-field gate. Field ``f`` has a pair of architecture weights ``alpha_f = (drop, keep)``; the gate is the
*keep* component of ``gumbel_softmax(alpha_f, tau)`` in training and of ``softmax(alpha_f / tau)`` in
evaluation:

    out[b, f, :] = gate_f * V[ids[b, f], :]

``alpha`` is not trained by the trainer's optimizer: the search schedule
(:mod:`optembed_ext.search.autofield`) updates it on validation batches (first-order DARTS). The fields with
the highest keep probability are kept (:meth:`AutoFieldEmbedding.select`).

Retrain stage (:class:`FieldSelectedEmbedding`): a table for the kept fields only; dropped fields embed to
zeros (so every backbone, built for ``F`` fields, works unchanged).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import EmbeddingModule


class AutoFieldEmbedding(EmbeddingModule):
    """Full table with a Gumbel-softmax keep/drop gate per field.

    Args:
        feature_map: the dataset's feature map.
        embed_dim: embedding dimension ``D``.
        temperature: initial Gumbel-softmax temperature ``tau`` (the search schedule anneals it).
    """

    def __init__(self, feature_map, embed_dim: int, temperature: float = 1.0):
        super().__init__(feature_map, embed_dim)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(self.num_features, embed_dim))
        nn.init.xavier_uniform_(self.weight)
        self.alpha = nn.Parameter(torch.zeros(self.num_fields, 2))     # columns: (drop, keep)

    def gates(self) -> torch.Tensor:
        """``(F,)`` keep gates: Gumbel-softmax samples in training, ``softmax(alpha / tau)`` otherwise."""
        if self.training:
            return F.gumbel_softmax(self.alpha, tau=self.temperature, hard=False, dim=-1)[:, 1]
        return torch.softmax(self.alpha / self.temperature, dim=-1)[:, 1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.global_ids(ids)
        return self.weight[ids] * self.gates()[None, :, None]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """The table only (``alpha`` is updated by the search schedule)."""
        return [{"params": [self.weight], "lr": lr, "weight_decay": weight_decay}]

    def keep_probabilities(self) -> torch.Tensor:
        """``softmax(alpha)[:, keep]`` per field, ``(F,)``."""
        return torch.softmax(self.alpha.detach(), dim=-1)[:, 1]

    def select(self, num_fields: int) -> list[int]:
        """Indices (ascending) of the ``num_fields`` fields with the highest keep probability."""
        if isinstance(num_fields, bool) or not isinstance(num_fields, int) or not 1 <= num_fields <= self.num_fields:
            raise ValueError(f"num_fields must be an int in [1, {self.num_fields}], got {num_fields!r}")
        order = torch.argsort(self.keep_probabilities(), descending=True, stable=True)
        return sorted(order[:num_fields].tolist())

    def num_params(self) -> int:
        return self.num_features * self.embed_dim


class FieldSelectedEmbedding(EmbeddingModule):
    """A ``(sum of kept cardinalities, D)`` table; fields not kept embed to zeros.

    Args:
        feature_map: the dataset's feature map.
        embed_dim: embedding dimension ``D``.
        keep: indices of the fields to keep.
    """

    def __init__(self, feature_map, embed_dim: int, keep: Sequence[int]):
        super().__init__(feature_map, embed_dim)
        keep = list(keep)
        if not keep or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_fields
                           for k in keep) or len(set(keep)) != len(keep):
            raise ValueError(f"keep must be distinct field indices in [0, {self.num_fields}), got {keep!r}")
        self.keep = sorted(keep)
        cards = [int(c) for c in feature_map.cardinalities]
        offsets = list(feature_map.offsets)
        keep_mask = torch.zeros(self.num_fields)
        row_map = torch.zeros(self.num_features, dtype=torch.long)
        nxt = 0
        for f in self.keep:
            keep_mask[f] = 1.0
            row_map[offsets[f]:offsets[f] + cards[f]] = torch.arange(nxt, nxt + cards[f])
            nxt += cards[f]
        self.register_buffer("keep_mask", keep_mask, persistent=False)
        self.register_buffer("row_map", row_map, persistent=False)
        self.weight = nn.Parameter(torch.empty(nxt, embed_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.global_ids(ids)
        return self.weight[self.row_map[ids]] * self.keep_mask[None, :, None]

    def num_params(self) -> int:
        return int(self.weight.numel())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", keep={self.keep}"
