"""Base class of every embedding module.

An embedding module maps a batch of global feature ids ``(B, F)`` (field offsets already added, see
:class:`optembed_ext.data.FeatureMap`) to field embeddings ``(B, F, embed_dim)``. With ``local_ids`` (the default of
:meth:`EmbeddingModule.from_cardinalities`) it takes per-field local ids instead (every field's ids start at 0, as
DeepCTR-Torch and torchfm pass them) and adds the field offsets itself.

Id checks never synchronise with a device and never guard on data: the shape and dtype are checked in Python, the
ranges (each field's column within its own block of ids) by one elementwise comparison whose verdict is raised as an
``IndexError`` in eager mode on the CPU and as a device-side assert (``torch._assert_async``) otherwise (CUDA,
``torch.compile``, ``torch.export``). Methods that give a field or a
feature fewer dimensions zero-pad the output to ``embed_dim``, so every module plugs into every model.

Besides ``forward`` a module tells the trainer how to optimise it (``param_groups``, ``regularization``,
``sparse_grad`` / ``sparse_parameters``) and how large it is as it would be served (``num_params``, ``sparsity``,
``memory_bytes``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

#: message of the device-side assert raised when global ids look like per-field local ids
LOCAL_IDS_HINT = "ids look like per-field local ids: pass local_ids=True (or add the field offsets)"


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - old torch
        return False


class EmbeddingModule(nn.Module):
    """Common interface of the embedding tables (uniform, OptEmbed, PEP, AutoDim, QR, ...).

    Args:
        feature_map: the dataset's :class:`~optembed_ext.data.FeatureMap` (field names and cardinalities).
        embed_dim: the (maximum) embedding dimension ``D``; ``forward`` always returns ``D`` columns.

    Subclasses implement ``forward`` and, where they differ from the defaults, ``num_params``,
    ``memory_bytes``, ``regularization`` and ``param_groups``.
    """

    #: True when the gradient of the table (:meth:`sparse_parameters`) is a sparse COO tensor.
    sparse_grad: bool = False

    def __init__(self, feature_map, embed_dim: int):
        super().__init__()
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        num_fields = int(feature_map.num_fields)
        if num_fields < 1:
            raise ValueError(f"feature_map must have at least one field, got {num_fields}")
        self.feature_map = feature_map
        self.num_fields = num_fields
        self.num_features = int(feature_map.num_features)
        self.embed_dim = embed_dim
        #: ids passed to ``forward`` are per-field local ids (``0 <= id < cardinality_f``); offsets added inside
        self.local_ids = False
        cards = torch.as_tensor([int(c) for c in feature_map.cardinalities], dtype=torch.long)
        offsets = torch.as_tensor([int(o) for o in feature_map.offsets], dtype=torch.long)
        # per-field id ranges (not in the state dict): global ids of field f lie in [_id_start[f], _id_end[f])
        self.register_buffer("_id_start", offsets, persistent=False)
        self.register_buffer("_id_end", offsets + cards, persistent=False)
        self.register_buffer("_id_card", cards, persistent=False)

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script`` (on this module or a model holding it) before compiling: TorchScript is
        not supported, say so instead of an error from deep inside the TorchScript compiler."""
        raise TypeError(f"{type(self).__name__} does not support TorchScript (torch.jit.script, deprecated by "
                        "PyTorch): deploy with torch.export (torch.export.export(model.eval(), (ids,)), then "
                        "torch.export.save to a .pt2; see optembed_ext.export) or run it with torch.compile")

    # ------------------------------------------------------------ construction
    @classmethod
    def from_cardinalities(cls, cardinalities: Sequence[int], embed_dim: int, *args, local_ids: bool = True,
                           field_names: Sequence[str] | None = None, dataset: str = "custom", **kwargs):
        """Build the module from a plain list of field cardinalities (no :class:`FeatureMap` needed).

        ``local_ids=True`` (default): ``forward`` takes per-field local ids (each field's ids start at 0, as
        DeepCTR-Torch and torchfm pass them), checks each field's range without a host sync and adds the field
        offsets itself. ``local_ids=False``: global ids (offsets already added). Other arguments go to the
        constructor (``cls(feature_map, embed_dim, *args, **kwargs)``).
        """
        from ..data.types import FeatureMap  # imported lazily: nn imports only torch at import time

        if isinstance(cardinalities, torch.Tensor):
            cardinalities = cardinalities.tolist()
        cards = [int(c) for c in cardinalities]
        names = list(field_names) if field_names is not None else [f"field_{i}" for i in range(len(cards))]
        module = cls(FeatureMap(dataset, names, cards), embed_dim, *args, **kwargs)
        module.local_ids = bool(local_ids)
        return module

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``ids`` (B, F) int64 global ids -> embeddings (B, F, embed_dim)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(ids)")

    def check_ids(self, ids: torch.Tensor, check_range: bool = True, local: bool | None = None) -> None:
        """Raise a clear error unless ``ids`` is an integer tensor (B, num_fields) of valid ids.

        ``local`` (default: :attr:`local_ids`) says whether the ids are per-field local ids. The range check
        (``check_range``) compares every column with its own field's range: an ``IndexError`` in eager mode on the
        CPU, a device-side assert (no host sync, no data-dependent guard) on other devices and while compiling or
        exporting. Global ids whose every column lies in ``[0, cardinality_f)`` but not in the field's block are
        reported as looking like per-field local ids.
        """
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be int64 or int32, got {ids.dtype}")
        if ids.dim() != 2 or ids.shape[1] != self.num_fields:
            raise ValueError(f"ids must have shape (B, {self.num_fields}), got {tuple(ids.shape)}")
        if check_range:
            self._check_ranges(ids, self.local_ids if local is None else bool(local))

    def _check_ranges(self, ids: torch.Tensor, local: bool) -> None:
        card = self._id_card
        if local:
            ok = ((ids >= 0) & (ids < card)).all()
        else:
            ok = ((ids >= self._id_start) & (ids < self._id_end)).all()
        if not _compiling() and ids.device.type == "cpu":
            if bool(ok):  # a CPU tensor: no device synchronisation
                return
            looks_local = not local and self.num_fields > 1 and bool(((ids >= 0) & (ids < card)).all())
            self._raise_range_error(ids, local, looks_local)
        if not local and self.num_fields > 1:
            # every column within [0, cardinality_f) but not within the field's block: local ids passed as global
            looks_local = ((ids >= 0) & (ids < card)).all() & ~ok
            torch._assert_async(~looks_local, f"{type(self).__name__}: {LOCAL_IDS_HINT}")
        what = "per-field local ids (indices) must lie in [0, cardinality_f)" if local else \
            "ids must lie in their field's range of indices [offset_f, offset_f + cardinality_f)"
        torch._assert_async(ok, f"{type(self).__name__}: {what}")

    def _raise_range_error(self, ids: torch.Tensor, local: bool, looks_local: bool) -> None:
        if looks_local:
            raise IndexError(f"{type(self).__name__}: {LOCAL_IDS_HINT}; every field's ids lie in "
                             f"[0, cardinality_f) but not in the field's global range")
        lo_all = torch.zeros_like(self._id_start) if local else self._id_start
        hi_all = self._id_card if local else self._id_end
        bad = ((ids < lo_all) | (ids >= hi_all)).any(dim=0)
        f = int(torch.nonzero(bad).flatten()[0])
        col = ids[:, f]
        lo, hi = int(col.min()), int(col.max())
        if local:
            raise IndexError(f"per-field local ids (indices) must lie in [0, cardinality) = [0, {int(hi_all[f])}) "
                             f"for field {f}, got values in [{lo}, {hi}]")
        raise IndexError(f"ids must lie in [0, {self.num_features}) and field {f}'s indices in "
                         f"[{int(lo_all[f])}, {int(hi_all[f])}), got values in [{lo}, {hi}]")

    def global_ids(self, ids: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """Check ``ids`` (see :meth:`check_ids`) and return them as global ids (offsets added with local ids)."""
        self.check_ids(ids, check_range=check_range)
        if self.local_ids:
            return ids + self._id_start.to(device=ids.device, dtype=ids.dtype)
        return ids

    # ---------------------------------------------------------------- training
    def regularization(self) -> torch.Tensor:
        """Extra loss term added to the BCE loss by the trainer (default 0)."""
        p = next(self.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups of this module; parameters left out are not trained by the trainer."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient is a sparse COO tensor (optimised by a sparse optimizer).

        Default: ``[self.weight]`` when ``sparse_grad`` is set and the module has a ``weight`` parameter.
        """
        weight = getattr(self, "weight", None)
        if self.sparse_grad and isinstance(weight, nn.Parameter):
            return [weight]
        return []

    # ------------------------------------------------------------------- sizes
    def dense_size(self) -> int:
        """Parameters of the uncompressed table: ``num_features * embed_dim``."""
        return self.num_features * self.embed_dim

    def num_params(self) -> int:
        """Effective (kept, non-zero) embedding parameters. Default: all parameters of the module."""
        return int(sum(p.numel() for p in self.parameters()))

    def sparsity(self) -> float:
        """``1 - num_params / (num_features * embed_dim)``."""
        return 1.0 - self.num_params() / float(self.dense_size())

    def memory_bytes(self) -> int:
        """Bytes of embedding storage as it would be served. Default: ``num_params`` times the element size."""
        p = next(self.parameters(), None)
        itemsize = p.element_size() if p is not None else 4
        return int(self.num_params() * itemsize)

    def extra_repr(self) -> str:
        local = ", local_ids=True" if self.local_ids else ""
        return f"num_features={self.num_features}, num_fields={self.num_fields}, embed_dim={self.embed_dim}{local}"
