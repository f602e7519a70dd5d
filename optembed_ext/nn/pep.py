"""PEP: learnable embedding sizes by soft-thresholding reparameterisation (Liu et al., ICLR 2021).

Every embedding entry is re-parameterised as

    S(V, s) = sign(V) * relu(|V| - g(s)),        g = sigmoid (times a constant ``gk``, 1 by default)

with a trainable threshold ``s`` whose granularity is one of

==================  ===================  =========================================
``threshold_type``  shape of ``s``       one threshold per
==================  ===================  =========================================
``global``          ``(1,)``             table
``dimension``       ``(D,)``             embedding dimension
``feature``         ``(N, 1)``           feature (row)
``feature_dim``     ``(N, D)``           entry
``field``           ``(F, 1)``           field
``field_dim``       ``(F, D)``           field and dimension
==================  ===================  =========================================

Entries that the threshold zeroes are pruned; as ``s`` grows under training (the weight decay on ``s``
pulls it towards 0, i.e. the threshold towards ``gk / 2``) the table becomes sparser. A pruning run saves the
mask whenever the kept-parameter count crosses a budget (:mod:`optembed_ext.search.pep`); the retraining run
builds :class:`PEPEmbedding` with that ``mask`` and a fixed table (no threshold) started from the initial
values of the pruning run (lottery ticket) or from a fresh initialisation.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import EmbeddingModule

THRESHOLD_TYPES = ("global", "dimension", "feature", "feature_dim", "field", "field_dim")

#: Threshold initialisations of the official code: MovieLens -15, Criteo/Avazu -150.
DEFAULT_THRESHOLD_INIT = {"movielens": -15.0, "criteo": -150.0, "avazu": -150.0}


def default_threshold_init(dataset: str) -> float:
    """The official ``s`` initialisation for ``dataset`` (-15 for MovieLens, -150 for Criteo/Avazu and others)."""
    name = str(dataset).lower()
    for key, value in DEFAULT_THRESHOLD_INIT.items():
        if key in name:
            return value
    return -150.0


def soft_threshold(v: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sign(v) * relu(|v| - threshold)`` (``threshold`` broadcast against ``v``)."""
    return torch.sign(v) * torch.relu(torch.abs(v) - threshold)


class PEPEmbedding(EmbeddingModule):
    """Embedding table with PEP's soft-threshold reparameterisation (pruning) or a fixed pruning mask (retrain).

    Args:
        feature_map: the dataset's feature map.
        embed_dim: embedding dimension ``D``.
        threshold_type: granularity of the threshold, one of :data:`THRESHOLD_TYPES`
            (official default ``feature_dim``).
        threshold_init: initial value of ``s`` (official: -15 MovieLens, -150 Criteo/Avazu;
            see :func:`default_threshold_init`).
        gk: scale of the threshold function, ``threshold = gk * sigmoid(s)`` (official 1).
        mask: optional ``(N, D)`` 0/1 tensor. When given the module is in *retrain* mode: the output is
            ``V * mask`` with no threshold (``s`` is kept, frozen, for reference only).
        init_weight: optional ``(N, D)`` initial values of ``V`` (e.g. the pruning run's initial table for
            lottery-ticket retraining); default ``xavier_uniform_``.
        threshold_lr: learning rate of ``s`` (default: the trainer's learning rate, as in the official code).
    """

    def __init__(self, feature_map, embed_dim: int, threshold_type: str = "feature_dim",
                 threshold_init: float = -15.0, gk: float = 1.0, mask: torch.Tensor | None = None,
                 init_weight: torch.Tensor | None = None, threshold_lr: float | None = None):
        super().__init__(feature_map, embed_dim)
        if threshold_type not in THRESHOLD_TYPES:
            raise ValueError(f"threshold_type must be one of {THRESHOLD_TYPES}, got {threshold_type!r}")
        if not (isinstance(threshold_init, (int, float)) and math.isfinite(threshold_init)):
            raise ValueError(f"threshold_init must be a finite number, got {threshold_init!r}")
        if not (isinstance(gk, (int, float)) and math.isfinite(gk) and gk >= 0):
            raise ValueError(f"gk must be a non-negative number, got {gk!r}")
        if threshold_lr is not None and not (isinstance(threshold_lr, (int, float)) and threshold_lr > 0):
            raise ValueError(f"threshold_lr must be a positive number or None, got {threshold_lr!r}")
        n, d, f = self.num_features, embed_dim, self.num_fields
        self.threshold_type = threshold_type
        self.threshold_init = float(threshold_init)
        self.gk = float(gk)
        self.threshold_lr = None if threshold_lr is None else float(threshold_lr)

        if init_weight is not None:
            init_weight = torch.as_tensor(init_weight, dtype=torch.float32)
            if tuple(init_weight.shape) != (n, d):
                raise ValueError(f"init_weight must have shape ({n}, {d}), got {tuple(init_weight.shape)}")
            self.weight = nn.Parameter(init_weight.detach().clone())
        else:
            self.weight = nn.Parameter(torch.empty(n, d))
            nn.init.xavier_uniform_(self.weight)

        shape = {"global": (1,), "dimension": (d,), "feature": (n, 1), "feature_dim": (n, d),
                 "field": (f, 1), "field_dim": (f, d)}[threshold_type]
        self.s = nn.Parameter(torch.full(shape, self.threshold_init))
        self.register_buffer("field_of_row", torch.as_tensor(feature_map.field_of_row(), dtype=torch.long),
                             persistent=False)

        if mask is not None:
            mask = torch.as_tensor(mask)
            if tuple(mask.shape) != (n, d):
                raise ValueError(f"mask must have shape ({n}, {d}), got {tuple(mask.shape)}")
            self.register_buffer("mask", (mask != 0).to(torch.float32))
            self.s.requires_grad_(False)
            with torch.no_grad():
                self.weight.mul_(self.mask)
        else:
            self.mask = None

    @property
    def retrain(self) -> bool:
        """True when a fixed pruning mask replaces the learnable threshold."""
        return self.mask is not None

    # ------------------------------------------------------------- thresholds
    def _rows_threshold(self, rows: torch.Tensor) -> torch.Tensor:
        """``gk * sigmoid(s)`` for the given global rows, broadcastable to ``rows.shape + (D,)``."""
        g = self.gk * torch.sigmoid(self.s)
        t = self.threshold_type
        if t in ("global", "dimension"):
            return g
        if t in ("feature", "feature_dim"):
            return g[rows]
        return g[self.field_of_row[rows]]  # field, field_dim

    def threshold(self) -> torch.Tensor:
        """The threshold of every entry, ``(N, D)``."""
        rows = torch.arange(self.num_features, device=self.weight.device)
        return self._rows_threshold(rows).expand(self.num_features, self.embed_dim)

    def sparse_weight(self) -> torch.Tensor:
        """The effective table: ``S(V, s)`` while pruning, ``V * mask`` when retraining."""
        if self.retrain:
            return self.weight * self.mask
        return soft_threshold(self.weight, self.threshold())

    def current_mask(self) -> torch.Tensor:
        """Bool ``(N, D)``: the entries kept now (non-zero in :meth:`sparse_weight`)."""
        with torch.no_grad():
            return self.sparse_weight() != 0

    # ---------------------------------------------------------------- forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.global_ids(ids)
        v = self.weight[ids]                                     # (B, F, D)
        if self.retrain:
            return v * self.mask[ids]
        return soft_threshold(v, self._rows_threshold(ids))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """The table and ``s`` (both with ``weight_decay``, as the official code; ``s`` at ``threshold_lr``)."""
        groups = [{"params": [self.weight], "lr": lr, "weight_decay": weight_decay}]
        if self.s.requires_grad:
            groups.append({"params": [self.s], "lr": self.threshold_lr or lr, "weight_decay": weight_decay})
        return groups

    @torch.no_grad()
    def to_compact(self, **kwargs):
        """The effective table without its all-zero rows, as a :class:`~optembed_ext.nn.CompactEmbedding`.

        Same ids in (local or global), the same outputs out; rows that PEP pruned entirely are not stored (the
        element-wise zeros inside kept rows are; PEP's element-level sparsity is what :meth:`memory_bytes`
        counts as CSR). ``kwargs`` go to :meth:`CompactEmbedding.from_table`.
        """
        from .compact import CompactEmbedding

        table = self.sparse_weight().detach()
        compact = CompactEmbedding.from_table(self.feature_map, table, (table != 0).any(dim=1), **kwargs)
        compact.local_ids = self.local_ids
        return compact

    # ------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        """Non-zero entries of the effective table."""
        with torch.no_grad():
            return int(torch.count_nonzero(self.sparse_weight()))

    def memory_bytes(self) -> int:
        """CSR storage of the effective table: values (element size) + int32 column ids + int64 row pointers."""
        nnz = self.num_params()
        return int(nnz * (self.weight.element_size() + 4) + (self.num_features + 1) * 8)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", threshold_type={self.threshold_type!r}, "
                f"threshold_init={self.threshold_init}, gk={self.gk}, retrain={self.retrain}")
