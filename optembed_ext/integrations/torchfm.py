"""torchfm adapter: replace every ``FeaturesEmbedding`` of a torchfm model by a compression table.

torchfm's ``FeaturesEmbedding(field_dims, embed_dim)`` takes per-field local ids ``(B, F)``, adds its field
offsets and returns ``(B, F, embed_dim)``; a table built with ``from_cardinalities(field_dims, embed_dim,
local_ids=True)`` has exactly that contract, so the swap is one call::

    from optembed_ext.integrations import torchfm as fm_adapter
    # model = torchfm.model.dfm.DeepFactorizationMachineModel(field_dims, 16, (64, 32), 0.0)
    emb, = fm_adapter.replace_embeddings(model, "optembed")
    opt = optembed_ext.nn.make_optimizer(model, torch.optim.Adam, lr=1e-3)
    loss = F.binary_cross_entropy(model(x), y) + optembed_ext.nn.regularization(model)

The first-order term (``FeaturesLinear``) is left as it is. torchfm's models return probabilities, so their loss
is ``binary_cross_entropy`` with the default mean reduction.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..nn.plugin import _copy_table, _set_submodule, make_table

__all__ = ["is_features_embedding", "find_features_embeddings", "cardinalities_of", "replace_embeddings"]


def is_features_embedding(module: nn.Module) -> bool:
    """True for torchfm's ``FeaturesEmbedding`` (an ``nn.Embedding`` ``embedding`` and per-field ``offsets``)."""
    return (isinstance(getattr(module, "embedding", None), nn.Embedding) and hasattr(module, "offsets")
            and not isinstance(module, nn.Embedding))


def find_features_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every torchfm ``FeaturesEmbedding`` in ``model``."""
    if not isinstance(model, nn.Module):
        return []
    return [(n, m) for n, m in model.named_modules() if n and is_features_embedding(m)]


def cardinalities_of(features_embedding: nn.Module) -> list[int]:
    """The field cardinalities (torchfm's ``field_dims``) of a ``FeaturesEmbedding``."""
    offsets = np.asarray(features_embedding.offsets, dtype=np.int64).reshape(-1).tolist()
    total = int(features_embedding.embedding.num_embeddings)
    ends = offsets[1:] + [total]
    return [int(e - s) for s, e in zip(offsets, ends)]


def replace_embeddings(model: nn.Module, method="optembed", *, embed_dim: int | None = None,
                       copy_weights: bool = True, **kwargs) -> list:
    """Replace every ``FeaturesEmbedding`` of ``model`` in place; returns the new tables (in module order).

    ``method``: ``"optembed"`` (default), ``"pep"``, ``"autodim"``, ``"uniform"`` or an ``EmbeddingModule``
    class; the table takes torchfm's local ids (``local_ids=True``) and keeps torchfm's ``embed_dim`` (another
    ``embed_dim`` is refused: the model's layers are sized for it). ``copy_weights`` starts a full table from the
    replaced one's values (torchfm initialises it with xavier, as the OptEmbed reference). ``kwargs`` go to the
    table's constructor.
    """
    found = find_features_embeddings(model)
    if not found:
        raise ValueError("model has no torchfm FeaturesEmbedding")
    new_tables = []
    for name, old in found:
        dim = int(old.embedding.embedding_dim)
        if embed_dim is not None and int(embed_dim) != dim:
            raise ValueError(f"{name!r} has embed_dim {dim}; the model's layers are built for it, got {embed_dim}")
        cards = cardinalities_of(old)
        new = make_table(method, cards, dim, local_ids=True, **kwargs).to(old.embedding.weight.device)
        _copy_table(old.embedding.weight, new, copy_weights)
        _set_submodule(model, name, new)
        new_tables.append(new)
    return new_tables


def local_ids(x) -> torch.Tensor:
    """torchfm's input ``(B, F)`` local ids as an int64 tensor."""
    return torch.as_tensor(x, dtype=torch.long)
