"""Physically compact embedding tables: only the kept rows of each field, each field at its own dimension.

A searched (row-masked, field-dim-masked) table of ``N x D`` values is served as one flat buffer ``packed``
holding, field after field, a dense row-major ``(R_f, D_f)`` table of the ``R_f`` kept rows of field ``f`` at its
dimension ``D_f``; ``remap (N,)`` maps a global id to its local row (-1 for a pruned id, which yields zeros or the
field's OOV vector). One fused op (:func:`optembed_ext.ops.compact_embedding`) serves every field in a single
launch and returns the zero-padded ``(B, F, D)`` tensor the masked model produced, so any backbone consumes it
unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import EmbeddingModule

REMAP_DTYPES = (torch.int32, torch.int64)


def _ops():
    from .. import ops  # imported lazily: the op module loads the compiled extension

    return ops


def _int_list(name: str, values, length: int) -> list[int]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}") from err
    if len(out) != length:
        raise ValueError(f"{name} must have {length} entries (one per field), got {len(out)}")
    return out


class CompactEmbedding(EmbeddingModule):
    """Per-field dense tables of the kept rows (field ``f``: ``field_rows[f] x field_dims[f]``) in one buffer.

    Args:
        feature_map: the dataset's feature map (``N`` global ids in ``F`` fields).
        embed_dim: ``D``, the width of the (zero-padded) output; every ``field_dims[f]`` lies in ``[0, D]``.
        field_rows: ``R_f``, kept rows of each field.
        field_dims: ``D_f``, dimension served for each field.
        oov: pruned ids of field ``f`` get a learned vector ``oov_weight[f, :D_f]`` instead of zeros.
        remap_dtype: int32 (default; 4 bytes per id) or int64.
        dtype: dtype of the tables.
        sparse: the gradient of ``packed`` is a sparse COO tensor (fine-tuning with a sparse optimizer).
        check_indices: validate ids (range and remapped rows) inside the op.

    The tables start uninitialised (zeros); fill them with :meth:`from_table` or ``load_state_dict``.
    Buffers ``field_offsets`` (F+1,), ``field_dims`` (F,), ``remap`` (N,) and the parameter ``packed`` (P,)
    are all in the state dict, so a saved state dict alone restores the module.
    """

    def __init__(self, feature_map, embed_dim: int, field_rows: Sequence[int], field_dims: Sequence[int], *,
                 oov: bool = False, remap_dtype: torch.dtype = torch.int32, dtype: torch.dtype = torch.float32,
                 sparse: bool = False, check_indices: bool = True):
        super().__init__(feature_map, embed_dim)
        F = self.num_fields
        rows = _int_list("field_rows", field_rows, F)
        dims = _int_list("field_dims", field_dims, F)
        cards = [int(c) for c in feature_map.cardinalities]
        for f, (r, d, c) in enumerate(zip(rows, dims, cards)):
            if not 0 <= d <= embed_dim:
                raise ValueError(f"field_dims[{f}] = {d} must lie in [0, embed_dim = {embed_dim}]")
            if not 0 <= r <= c:
                raise ValueError(f"field_rows[{f}] = {r} must lie in [0, cardinality = {c}]")
        if remap_dtype not in REMAP_DTYPES:
            raise ValueError(f"remap_dtype must be torch.int32 or torch.int64, got {remap_dtype}")
        if remap_dtype == torch.int32 and max(rows, default=0) > torch.iinfo(torch.int32).max:
            raise ValueError("remap_dtype int32 cannot address more than 2**31-1 rows per field; use int64")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        sizes = [0 if d == 0 else r * d for r, d in zip(rows, dims)]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self.field_rows = [0 if d == 0 else r for r, d in zip(rows, dims)]
        self.sparse_grad = bool(sparse)
        self.check_indices = bool(check_indices)
        self._layout_checked = False
        self.packed = nn.Parameter(torch.zeros(offsets[-1], dtype=dtype))
        self.register_buffer("field_offsets", torch.tensor(offsets, dtype=torch.long))
        self.register_buffer("field_dims", torch.tensor(dims, dtype=torch.long))
        self.register_buffer("remap", torch.full((self.num_features,), -1, dtype=remap_dtype))
        if oov:
            self.oov_weight = nn.Parameter(torch.zeros(F, embed_dim, dtype=dtype))
        else:
            self.register_parameter("oov_weight", None)

    # ------------------------------------------------------------------ build
    @classmethod
    @torch.no_grad()
    def from_table(cls, feature_map, weight: torch.Tensor, row_mask: torch.Tensor | None = None,
                   field_dims: Sequence[int] | None = None, oov_weight: torch.Tensor | None = None,
                   **kwargs) -> "CompactEmbedding":
        """Pack the kept rows of a uniform ``(N, D)`` table.

        ``row_mask`` bool (N,) (None keeps every row), ``field_dims`` (F,) (None = D for every field),
        ``oov_weight`` (F, D) or None; ``kwargs`` go to the constructor (``remap_dtype``, ``sparse``, ...).
        The result reproduces ``masked_embedding(weight, ids, dims=field_dims)`` with pruned rows zeroed (or
        replaced by ``oov_weight[f, :D_f]``) exactly.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor (N, D), got {getattr(weight, 'shape', weight)!r}")
        N, D = weight.shape
        if N != int(feature_map.num_features):
            raise ValueError(f"weight has {N} rows but feature_map has {feature_map.num_features} features")
        F = int(feature_map.num_fields)
        device = weight.device
        if row_mask is None:
            row_mask = torch.ones(N, dtype=torch.bool, device=device)
        row_mask = torch.as_tensor(row_mask, device=device)
        if row_mask.dtype != torch.bool or tuple(row_mask.shape) != (N,):
            raise ValueError(f"row_mask must be a bool tensor of shape ({N},), got {row_mask.dtype} "
                             f"{tuple(row_mask.shape)}")
        dims = [D] * F if field_dims is None else _int_list("field_dims", field_dims, F)
        if oov_weight is not None and tuple(oov_weight.shape) != (F, D):
            raise ValueError(f"oov_weight must have shape ({F}, {D}), got {tuple(oov_weight.shape)}")
        starts = [int(o) for o in feature_map.offsets] + [N]
        kept = [torch.nonzero(row_mask[starts[f]:starts[f + 1]]).flatten() + starts[f] for f in range(F)]
        rows = [int(k.numel()) for k in kept]
        kwargs.setdefault("dtype", weight.dtype)
        module = cls(feature_map, int(D), rows, dims, oov=oov_weight is not None, **kwargs).to(device)
        blocks, remap = [], module.remap
        for f in range(F):
            if dims[f] == 0:
                continue  # a zero-width field serves only zeros: no rows kept, every id maps to -1
            blocks.append(weight[kept[f], :dims[f]].reshape(-1))
            remap[kept[f]] = torch.arange(rows[f], device=device, dtype=remap.dtype)
        if blocks:
            module.packed.copy_(torch.cat(blocks).to(module.packed.dtype))
        if oov_weight is not None:
            module.oov_weight.copy_(oov_weight)
        return module

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The equivalent ``(N, D)`` table: kept rows at their field dims, zeros elsewhere (OOV not included)."""
        out = self.packed.new_zeros(self.num_features, self.embed_dim)
        starts = [int(o) for o in self.feature_map.offsets] + [self.num_features]
        remap = self.remap.long()
        for f in range(self.num_fields):
            ids = torch.arange(starts[f], starts[f + 1], device=out.device)
            local = remap[ids]
            keep = local >= 0
            if int(self.field_dims[f]) > 0 and bool(keep.any()):
                out[ids[keep], :int(self.field_dims[f])] = self.table(f)[local[keep]]
        return out

    def table(self, field: int) -> torch.Tensor:
        """View of field ``field``'s compact table, ``(R_f, D_f)``."""
        d = int(self.field_dims[field])
        lo, hi = int(self.field_offsets[field]), int(self.field_offsets[field + 1])
        return self.packed[lo:hi].view(-1, d) if d > 0 else self.packed[lo:hi].view(0, 0)

    # ---------------------------------------------------------------- forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # per-field ranges checked without a host sync (device-side assert); the op checks the remapped rows
        if not self.check_indices and not self._layout_checked:
            self._validate_layout()  # once: unchecked CUDA lookups do not read the layout back to the host
        ids = self.global_ids(ids, check_range=self.check_indices)
        return _ops().compact_embedding(self.packed, self.field_offsets, self.field_dims, self.remap, ids,
                                        self.embed_dim, self.oov_weight, check_indices=self.check_indices,
                                        sparse=self.sparse_grad)

    def _validate_layout(self) -> None:
        """ValueError unless ``field_offsets`` / ``field_dims`` describe blocks of ``packed`` (a lookup of no ids)."""
        with torch.no_grad():
            no_ids = torch.zeros(0, self.num_fields, dtype=torch.long, device=self.packed.device)
            _ops().compact_embedding(self.packed, self.field_offsets, self.field_dims, self.remap, no_ids,
                                     self.embed_dim, self.oov_weight, check_indices=True)
        self._layout_checked = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._layout_checked = False  # a loaded layout is validated again before the next unchecked lookup

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.packed] if self.sparse_grad else []

    # ------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        """Stored table values: ``sum_f R_f * D_f`` (the OOV vectors are counted in :meth:`memory_bytes`)."""
        return int(self.packed.numel())

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes of each stored piece: tables, id remap, OOV vectors ``(F, D)``, per-field offsets and dims."""
        oov = 0 if self.oov_weight is None else self.oov_weight.numel() * self.oov_weight.element_size()
        return {
            "packed": int(self.packed.numel() * self.packed.element_size()),
            "remap": int(self.remap.numel() * self.remap.element_size()),
            "oov": int(oov),
            "field_offsets": int(self.field_offsets.numel() * self.field_offsets.element_size()),
            "field_dims": int(self.field_dims.numel() * self.field_dims.element_size()),
        }

    def memory_bytes(self) -> int:
        """Bytes held: ``sum_f R_f D_f * itemsize + N * remap_itemsize + (2F + 1) * 8`` (offsets and dims, int64)
        ``+ F * D * itemsize`` with OOV vectors."""
        return int(sum(self.memory_breakdown().values()))

    def config(self) -> dict:
        """JSON-able constructor arguments (with :attr:`feature_map`) that rebuild an empty module of this shape
        (``local_ids`` only when set)."""
        cfg = {
            "embed_dim": self.embed_dim,
            "field_rows": list(self.field_rows),
            "field_dims": [int(d) for d in self.field_dims.tolist()],
            "oov": self.oov_weight is not None,
            "remap_dtype": str(self.remap.dtype).replace("torch.", ""),
            "dtype": str(self.packed.dtype).replace("torch.", ""),
            "sparse": self.sparse_grad,
            "check_indices": self.check_indices,
        }
        if self.local_ids:
            cfg["local_ids"] = True
        return cfg

    @classmethod
    def from_config(cls, feature_map, config: dict) -> "CompactEmbedding":
        cfg = dict(config)
        for key in ("remap_dtype", "dtype"):
            if key in cfg and isinstance(cfg[key], str):
                cfg[key] = getattr(torch, cfg[key])
        embed_dim = int(cfg.pop("embed_dim"))
        rows, dims = cfg.pop("field_rows"), cfg.pop("field_dims")
        local_ids = bool(cfg.pop("local_ids", False))
        module = cls(feature_map, embed_dim, rows, dims, **cfg)
        module.local_ids = local_ids
        return module

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", kept_rows={sum(self.field_rows)}, "
                f"field_dims={[int(d) for d in self.field_dims.tolist()]}, oov={self.oov_weight is not None}")
