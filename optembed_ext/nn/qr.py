"""Quotient-remainder compositional embeddings (Shi et al., KDD 2020).

For a field of cardinality ``n`` hashed with ``c`` collisions, feature ``i`` (local id) is the composition of
a row of a *quotient* table with ``ceil(n / c)`` rows, indexed by ``i // c``, and a row of a *remainder*
table with ``c`` rows, indexed by ``i % c``. The pair ``(i // c, i % c)`` is unique, so no two features share
both rows (complementary partitions). The two rows are combined by

- ``"mult"``: element-wise product (both tables ``D`` wide; the default of the paper),
- ``"add"``: sum (both ``D`` wide),
- ``"concat"``: concatenation (quotient ``D - D // 2`` wide, remainder ``D // 2`` wide).

Fields with ``c <= 1`` or a cardinality at most ``min_cardinality`` keep a full ``(n, D)`` table. Tables are
initialised ``U(-1/sqrt(rows), 1/sqrt(rows))`` as in DLRM's QR embedding.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import EmbeddingModule

OPERATIONS = ("mult", "add", "concat")


def resolve_collisions(feature_map, collisions) -> list[int]:
    """Collisions per field from an int (all fields), a per-field sequence, or a ``{field_name: c}`` mapping
    (fields not named get 1, i.e. a full table)."""
    names = list(feature_map.field_names)
    nf = len(names)
    if isinstance(collisions, bool):
        raise ValueError(f"collisions must be an int, a sequence or a mapping, got {collisions!r}")
    if isinstance(collisions, int):
        out = [collisions] * nf
    elif isinstance(collisions, Mapping):
        unknown = sorted(set(collisions) - set(names))
        if unknown:
            raise ValueError(f"collisions names unknown fields {unknown}; fields are {names}")
        out = [collisions.get(n, 1) for n in names]
    elif isinstance(collisions, Sequence) and not isinstance(collisions, (str, bytes)):
        out = list(collisions)
        if len(out) != nf:
            raise ValueError(f"collisions must have one entry per field ({nf}), got {len(out)}")
    else:
        raise ValueError(f"collisions must be an int, a sequence or a mapping, got {collisions!r}")
    for c in out:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"collisions must be positive ints, got {collisions!r}")
    return [int(c) for c in out]


def _uniform_table(rows: int, dim: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(rows)
    return nn.Parameter(torch.empty(rows, dim).uniform_(-bound, bound))


class QREmbedding(EmbeddingModule):
    """Per-field quotient-remainder embedding.

    Args:
        feature_map: the dataset's feature map.
        embed_dim: output dimension ``D``.
        collisions: collisions ``c`` per field: one int for every field (default 4), a per-field sequence or a
            ``{field_name: c}`` mapping. ``c`` is capped at the field's cardinality.
        operation: ``"mult"`` (default), ``"add"`` or ``"concat"``.
        min_cardinality: fields with at most this many features keep a full table (default 0: none).
    """

    def __init__(self, feature_map, embed_dim: int, collisions=4, operation: str = "mult",
                 min_cardinality: int = 0):
        super().__init__(feature_map, embed_dim)
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
        if operation == "concat" and embed_dim < 2:
            raise ValueError(f"embed_dim must be >= 2 with operation='concat', got {embed_dim}")
        if isinstance(min_cardinality, bool) or not isinstance(min_cardinality, int) or min_cardinality < 0:
            raise ValueError(f"min_cardinality must be a non-negative int, got {min_cardinality!r}")
        self.operation = operation
        self.min_cardinality = min_cardinality
        self.cardinalities = [int(c) for c in feature_map.cardinalities]
        requested = resolve_collisions(feature_map, collisions)
        self.collisions = []
        for card, c in zip(self.cardinalities, requested):
            c = min(c, card)
            if card <= min_cardinality:
                c = 1
            self.collisions.append(c)
        self.register_buffer("offsets", torch.as_tensor(list(feature_map.offsets), dtype=torch.long),
                             persistent=False)
        d = embed_dim
        dq, dr = (d - d // 2, d // 2) if operation == "concat" else (d, d)
        self.quotient = nn.ParameterList()
        self.remainder = nn.ParameterList()
        for card, c in zip(self.cardinalities, self.collisions):
            if c == 1:
                self.quotient.append(_uniform_table(card, d))
                self.remainder.append(nn.Parameter(torch.empty(0, dr), requires_grad=False))
            else:
                self.quotient.append(_uniform_table(-(-card // c), dq))
                self.remainder.append(_uniform_table(c, dr))

    def is_compressed(self, field: int) -> bool:
        """True when ``field`` uses a quotient-remainder pair (collisions > 1)."""
        return self.collisions[field] > 1

    def table_shapes(self) -> list[dict]:
        """Per field: ``{"quotient": (rows, dim), "remainder": (rows, dim) or None}``."""
        out = []
        for f in range(self.num_fields):
            q = tuple(self.quotient[f].shape)
            r = tuple(self.remainder[f].shape) if self.is_compressed(f) else None
            out.append({"quotient": q, "remainder": r})
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.global_ids(ids)
        local = ids - self.offsets
        cols = []
        for f, c in enumerate(self.collisions):
            i = local[:, f]
            if c == 1:
                cols.append(self.quotient[f][i])
                continue
            q = self.quotient[f][torch.div(i, c, rounding_mode="floor")]
            r = self.remainder[f][torch.remainder(i, c)]
            if self.operation == "mult":
                cols.append(q * r)
            elif self.operation == "add":
                cols.append(q + r)
            else:
                cols.append(torch.cat([q, r], dim=-1))
        return torch.stack(cols, dim=1)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        params = [p for p in self.parameters() if p.requires_grad and p.numel() > 0]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def num_params(self) -> int:
        """Entries of all quotient, remainder and full tables."""
        return int(sum(p.numel() for p in self.quotient) +
                   sum(p.numel() for f, p in enumerate(self.remainder) if self.is_compressed(f)))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", collisions={self.collisions}, operation={self.operation!r}"
