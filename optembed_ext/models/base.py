"""Base class of the CTR models: everything after the embedding lookup."""
from __future__ import annotations

import torch
from torch import nn


class CTRModel(nn.Module):
    """A CTR backbone around an injected embedding module.

    ``forward(ids)`` equals ``predict_from_embeddings(self.embedding(ids), ids)``. ``predict_from_embeddings``
    holds everything except the embedding lookup (first-order terms read ``ids``) and accepts any leading batch
    shape: ``emb (..., F, D)`` and ``ids`` broadcastable to ``(..., F)`` give logits ``(...)``; the evolutionary
    search stacks candidate architectures along these leading dimensions. In training mode batch norm sees the
    whole stacked batch, so stacked evaluation is meant for ``eval()`` mode.
    """

    #: registry name, set by subclasses
    name: str = ""
    #: True when the model has a first-order linear term over the ids
    has_linear: bool = False

    def __init__(self, feature_map, embedding: nn.Module):
        super().__init__()
        if not isinstance(embedding, nn.Module):
            raise TypeError(f"embedding must be an nn.Module (an EmbeddingModule), got {type(embedding).__name__}")
        num_fields = int(feature_map.num_fields)
        for attr in ("num_fields", "embed_dim"):
            if not hasattr(embedding, attr):
                raise TypeError(f"embedding must define {attr!r} (see optembed_ext.nn.EmbeddingModule)")
        if embedding.num_fields != num_fields:
            raise ValueError(f"embedding has {embedding.num_fields} fields but feature_map has {num_fields}")
        self.feature_map = feature_map
        self.embedding = embedding
        self.num_fields = num_fields
        self.num_features = int(feature_map.num_features)
        self.embed_dim = int(embedding.embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (B, F) global ids -> logits (B,)."""
        return self.predict_from_embeddings(self.embedding(ids), ids)

    def predict_from_embeddings(self, emb: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """``emb`` (..., F, D) and ``ids`` broadcastable to (..., F) -> logits (...)."""
        if emb.dim() < 3 or emb.shape[-2:] != (self.num_fields, self.embed_dim):
            raise ValueError(f"emb must have shape (..., {self.num_fields}, {self.embed_dim}), got {tuple(emb.shape)}")
        lead = emb.shape[:-2]
        flat_emb = emb.reshape(-1, self.num_fields, self.embed_dim)
        flat_ids = None
        if ids is not None:
            if ids.shape[-1:] != (self.num_fields,):
                raise ValueError(f"ids must have shape (..., {self.num_fields}), got {tuple(ids.shape)}")
            try:
                flat_ids = ids.expand(*lead, self.num_fields).reshape(-1, self.num_fields)
            except RuntimeError as err:
                raise ValueError(f"ids of shape {tuple(ids.shape)} do not broadcast to emb's leading shape "
                                 f"{tuple(lead)}") from err
        elif self.has_linear:
            raise ValueError(f"{type(self).__name__} has a first-order term and needs ids")
        return self.logits(flat_emb, flat_ids).reshape(lead)

    def logits(self, emb: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - abstract
        """Flat batch: ``emb`` (B, F, D), ``ids`` (B, F) -> (B,)."""
        raise NotImplementedError
