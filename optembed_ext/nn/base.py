"""Base class of every embedding module.

An embedding module maps a batch of global feature ids ``(B, F)`` (field offsets already added, see
:class:`optembed_ext.data.FeatureMap`) to field embeddings ``(B, F, embed_dim)``. Methods that give a field or a
feature fewer dimensions zero-pad the output to ``embed_dim``, so every module plugs into every model.

Besides ``forward`` a module tells the trainer how to optimise it (``param_groups``, ``regularization``,
``sparse_grad`` / ``sparse_parameters``) and how large it is as it would be served (``num_params``, ``sparsity``,
``memory_bytes``).
"""
from __future__ import annotations

import torch
from torch import nn


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

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``ids`` (B, F) int64 global ids -> embeddings (B, F, embed_dim)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(ids)")

    def check_ids(self, ids: torch.Tensor, check_range: bool = True) -> None:
        """Raise a clear error unless ``ids`` is an integer tensor (B, num_fields) of valid global ids."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be int64 or int32, got {ids.dtype}")
        if ids.dim() != 2 or ids.shape[1] != self.num_fields:
            raise ValueError(f"ids must have shape (B, {self.num_fields}), got {tuple(ids.shape)}")
        if check_range and ids.numel() > 0:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_features:
                raise IndexError(f"ids must lie in [0, {self.num_features}), got values in [{lo}, {hi}]")

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
        return f"num_features={self.num_features}, num_fields={self.num_fields}, embed_dim={self.embed_dim}"
