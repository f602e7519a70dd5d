"""TorchRec adapter: a compression table where a TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection`` stood.

TorchRec models look their sparse features up with a ``KeyedJaggedTensor`` (KJT: one key per feature, each
sample's ids of that feature as a bag, every feature's ids local to its own table). :func:`from_torchrec` builds,
from the collection's configs (``num_embeddings``, ``embedding_dim``, ``feature_names``, ``pooling``), a module with
the same contract:

* :class:`TorchRecEmbeddingBagCollection` (for an ``EmbeddingBagCollection``): KJT in, ``KeyedTensor`` out (keys =
  feature names, ``(B, F * D)`` values), each bag pooled by its table's ``SUM`` or ``MEAN`` (an empty bag gives
  zeros, as TorchRec), per-id weights honoured when the collection ``is_weighted``;
* :class:`TorchRecEmbeddingCollection` (for an ``EmbeddingCollection``): KJT in, ``dict[str, JaggedTensor]`` out,
  one ``(n_f, D)`` row per id with the input's lengths.

Inside, one table of :mod:`optembed_ext.nn` (``"optembed"``, ``"pep"``, ``"autodim"``, ``"uniform"``) holds every
feature as one field (field ``f`` = feature ``f``'s table, its cardinality ``num_embeddings``), takes TorchRec's
per-feature local ids (``local_ids=True``: the field offsets are added and each feature's range is checked inside
the table) and is found by :func:`optembed_ext.nn.make_optimizer`, :func:`~optembed_ext.nn.regularization`,
:class:`~optembed_ext.nn.SupernetHook` and :func:`~optembed_ext.nn.to_compact` like any other table::

    from optembed_ext.integrations import torchrec as trec_adapter
    model.sparse = trec_adapter.from_torchrec(model.sparse, "optembed")   # or replace_embeddings(model)
    opt = optembed_ext.nn.make_optimizer(model, torch.optim.Adam, lr=1e-3)
    loss = F.binary_cross_entropy_with_logits(model(kjt), y) + optembed_ext.nn.regularization(model)

Bags hold at most ``max_values`` ids (default 1: single-valued features; a bag may also be empty). A bag of ``k``
ids is looked up as ``k`` rows of a ``(B * max_values, F)`` id matrix, so a supernet's sampled dims apply per id
rather than per sample for multi-valued features. Refused with a clear error: tables shared by several features,
tables of different ``embedding_dim``, pooling other than ``SUM``/``MEAN``, variable batch sizes per feature
(``variable_stride_per_key``) and sharded collections (replace the tables before sharding). The dims search
(:func:`~optembed_ext.integrations.search_dims`) feeds ``(B, F)`` id tensors: give it ``IdInput(model, names)``, the
model behind a ``(B, F)`` local ids -> KJT conversion (single-valued features).

TorchRec is imported only inside the functions that build its outputs (``pip install torchrec fbgemm-gpu-cpu``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn.base import EmbeddingModule, _compiling
from ..nn.plugin import _copy_table, _set_submodule, make_table

__all__ = ["TorchRecEmbeddingBagCollection", "TorchRecEmbeddingCollection", "from_torchrec", "replace_embeddings",
           "is_torchrec_collection", "find_collections", "local_ids_to_kjt", "IdInput"]

_COLLECTIONS = ("EmbeddingBagCollection", "EmbeddingCollection")
POOLINGS = ("SUM", "MEAN")


def _require_torchrec():
    try:
        import torchrec
    except Exception as err:  # ImportError, or OSError from FBGEMM's shared library
        raise ImportError(f"the TorchRec adapter needs torchrec and fbgemm-gpu-cpu (or fbgemm-gpu) matching torch "
                          f"{torch.__version__}: see scripts/setup.sh ({type(err).__name__}: {err})") from err
    return torchrec


def is_torchrec_collection(module) -> bool:
    """True for TorchRec's (unsharded) ``EmbeddingBagCollection`` or ``EmbeddingCollection``."""
    cls = type(module)
    return cls.__name__ in _COLLECTIONS and cls.__module__.startswith("torchrec")


def _is_sharded_collection(module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("torchrec") and cls.__name__.startswith("Sharded") and \
        cls.__name__.endswith(_COLLECTIONS)


def find_collections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every TorchRec embedding collection in ``model`` (``""`` for the model itself)."""
    if not isinstance(model, nn.Module):
        return []
    return [(n, m) for n, m in model.named_modules() if is_torchrec_collection(m)]


class _TorchRecTable(nn.Module):
    """Shared part of both collections: KJT -> ``(B, max_values, F, D)`` looked-up rows and the bag mask."""

    def __init__(self, table: EmbeddingModule, feature_names: Sequence[str], max_values: int = 1):
        super().__init__()
        if not isinstance(table, EmbeddingModule):
            raise TypeError(f"table must be an EmbeddingModule, got {type(table).__name__}")
        names = [str(n) for n in feature_names]
        if len(names) != table.num_fields:
            raise ValueError(f"feature_names has {len(names)} entries but the table has {table.num_fields} fields")
        if len(set(names)) != len(names):
            raise ValueError(f"feature_names must be unique, got {names}")
        if not table.local_ids:
            raise ValueError("the table must take per-field local ids (build it with local_ids=True): TorchRec "
                             "passes each feature's ids local to its own table")
        if isinstance(max_values, bool) or not isinstance(max_values, int) or max_values < 1:
            raise ValueError(f"max_values must be a positive int, got {max_values!r}")
        self.table = table
        self.feature_names = names
        self.max_values = int(max_values)

    @property
    def embed_dim(self) -> int:
        return int(self.table.embed_dim)

    def _ordered(self, kjt):
        if not hasattr(kjt, "keys") or not hasattr(kjt, "lengths") or not hasattr(kjt, "values"):
            raise TypeError(f"features must be a torchrec KeyedJaggedTensor, got {type(kjt).__name__}")
        keys = list(kjt.keys())
        if keys == self.feature_names:
            return kjt
        missing = [n for n in self.feature_names if n not in keys]
        if missing:
            raise KeyError(f"the KeyedJaggedTensor lacks the features {missing}; it has keys {keys}, this "
                           f"collection looks up {self.feature_names}")
        return kjt.permute([keys.index(n) for n in self.feature_names])  # extra keys are dropped, as TorchRec does

    def _lookup(self, kjt):
        """``(emb (B, L, F, D), valid (B, L, F) bool, lengths (F, B), weights (B, L, F) or None)``."""
        kjt = self._ordered(kjt)
        if getattr(kjt, "variable_stride_per_key", lambda: False)():
            raise NotImplementedError("KeyedJaggedTensors with a variable batch size per feature "
                                      "(variable_stride_per_key) are not supported")
        F, L = len(self.feature_names), self.max_values
        B = int(kjt.stride())
        values = kjt.values()
        if values.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"KeyedJaggedTensor values must be int64 or int32 ids, got {values.dtype}")
        lengths = kjt.lengths().reshape(F, B).long()
        self._check_lengths(lengths)
        flat = lengths.reshape(-1)
        starts = (torch.cumsum(flat, 0) - flat).reshape(F, B, 1)
        j = torch.arange(L, device=values.device)
        valid = j < lengths.unsqueeze(-1)                                   # (F, B, L)
        n = values.shape[0]
        index = torch.where(valid, starts + j, torch.full_like(starts, n))  # padded slots read one extra 0 id
        ids = torch.cat([values, values.new_zeros(1)])[index]               # (F, B, L)
        emb = self.table(ids.permute(1, 2, 0).reshape(B * L, F))            # one (B * L, F) lookup
        emb = emb.reshape(B, L, F, -1)
        weights = kjt.weights_or_none() if hasattr(kjt, "weights_or_none") else None
        if weights is not None:
            weights = torch.cat([weights, weights.new_zeros(1)])[index].permute(1, 2, 0)
        return emb, valid.permute(1, 2, 0), lengths, weights

    def _check_lengths(self, lengths: torch.Tensor) -> None:
        ok = (lengths <= self.max_values).all() & (lengths >= 0).all()
        if not _compiling() and lengths.device.type == "cpu":
            if bool(ok):
                return
            f = int(torch.nonzero((lengths > self.max_values).any(dim=1)).flatten()[0])
            raise ValueError(f"feature {self.feature_names[f]!r} has a bag of {int(lengths[f].max())} ids but this "
                             f"collection was built with max_values={self.max_values} (pass a larger max_values to "
                             "from_torchrec for multi-valued features)")
        torch._assert_async(ok, f"a KeyedJaggedTensor bag holds more than max_values={self.max_values} ids")

    def extra_repr(self) -> str:
        return f"features={self.feature_names}, max_values={self.max_values}"


class TorchRecEmbeddingBagCollection(_TorchRecTable):
    """Stands where a TorchRec ``EmbeddingBagCollection`` stood: ``KeyedJaggedTensor`` -> ``KeyedTensor``.

    Args:
        table: a compression table with one field per feature, taking local ids (``local_ids=True``).
        feature_names: the features (KJT keys) in field order.
        pooling: ``"SUM"`` or ``"MEAN"``, one for all features or one per feature.
        max_values: most ids a bag may hold (1: single-valued features; bags may be empty).
        is_weighted: pool with the KJT's per-id weights (``weights``), as a weighted TorchRec collection.
    """

    def __init__(self, table: EmbeddingModule, feature_names: Sequence[str], pooling="SUM", max_values: int = 1,
                 is_weighted: bool = False):
        super().__init__(table, feature_names, max_values)
        pools = [pooling] * len(self.feature_names) if isinstance(pooling, str) else list(pooling)
        pools = [str(getattr(p, "value", p)).upper() for p in pools]
        if len(pools) != len(self.feature_names) or any(p not in POOLINGS for p in pools):
            raise ValueError(f"pooling must be one of {POOLINGS} (or one per feature), got {pooling!r}")
        self.pooling = pools
        self._weighted = bool(is_weighted)
        self.register_buffer("_mean", torch.tensor([p == "MEAN" for p in pools]), persistent=False)

    def is_weighted(self) -> bool:
        return self._weighted

    def embeddings(self, features) -> torch.Tensor:
        """The pooled ``(B, F, D)`` embeddings (what ``forward`` returns as a ``KeyedTensor``)."""
        emb, valid, lengths, weights = self._lookup(features)
        w = valid.to(emb.dtype)
        if self._weighted:
            if weights is None:
                raise ValueError("this collection is weighted (is_weighted): the KeyedJaggedTensor needs weights")
            w = w * weights.to(emb.dtype)
        pooled = (emb * w.unsqueeze(-1)).sum(dim=1)                                      # (B, F, D)
        if bool(self.pooling.count("MEAN")):
            count = lengths.t().clamp(min=1).to(emb.dtype)                               # (B, F)
            scale = torch.where(self._mean, 1.0 / count, torch.ones_like(count))
            pooled = pooled * scale.unsqueeze(-1)
        return pooled

    def forward(self, features):
        from torchrec import KeyedTensor

        pooled = self.embeddings(features)
        B, F, D = pooled.shape
        return KeyedTensor(keys=list(self.feature_names), length_per_key=[D] * F, values=pooled.reshape(B, F * D))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pooling={self.pooling}, is_weighted={self._weighted}"


class TorchRecEmbeddingCollection(_TorchRecTable):
    """Stands where a TorchRec ``EmbeddingCollection`` stood: ``KeyedJaggedTensor`` -> ``dict[str, JaggedTensor]``
    (one ``(n_f, D)`` row per id of feature ``f``, the input's lengths)."""

    def forward(self, features):
        from torchrec import JaggedTensor

        emb, valid, lengths, _ = self._lookup(features)
        out = {}
        for f, name in enumerate(self.feature_names):
            rows = emb[:, :, f, :][valid[:, :, f]]  # (B, L) row-major = the KJT's order of the feature's ids
            out[name] = JaggedTensor(values=rows, lengths=lengths[f].to(torch.int32))
        return out


# ---------------------------------------------------------------------------------------------------- build
def _configs(module):
    if type(module).__name__ == "EmbeddingBagCollection":
        return list(module.embedding_bag_configs()), True
    return list(module.embedding_configs()), False


def _source_weight(module, config, bags: bool):
    holder = module.embedding_bags if bags else module.embeddings
    mod = holder[config.name] if config.name in holder else None
    return None if mod is None else getattr(mod, "weight", None)


def from_torchrec(collection: nn.Module, method="optembed", *, max_values: int = 1, copy_weights: bool = True,
                  **kwargs) -> _TorchRecTable:
    """A module with ``collection``'s contract (KJT in, ``KeyedTensor`` / ``dict[str, JaggedTensor]`` out) whose
    rows live in one compression table (``method``: ``"optembed"``, ``"pep"``, ``"autodim"``, ``"uniform"`` or an
    ``EmbeddingModule`` class; ``kwargs`` go to its constructor).

    One field per feature (its table's ``num_embeddings`` rows); every table must hold one feature and all share
    one ``embedding_dim``. ``copy_weights`` starts a full table (OptEmbed, PEP, uniform) from TorchRec's values.
    ``max_values``: most ids per bag (1 for single-valued features).
    """
    if _is_sharded_collection(collection):
        raise TypeError(f"{type(collection).__name__} is sharded: replace the tables of the unsharded model, then "
                        "shard it (or export a searched model with optembed_ext.export.torchrec)")
    if not is_torchrec_collection(collection):
        raise TypeError(f"collection must be a torchrec EmbeddingBagCollection or EmbeddingCollection, got "
                        f"{type(collection).__name__}")
    configs, bags = _configs(collection)
    if not configs:
        raise ValueError("the collection has no tables")
    names, cards, dims, pools = [], [], set(), []
    for c in configs:
        feats = list(c.feature_names)
        if len(feats) != 1:
            raise NotImplementedError(f"table {c.name!r} is shared by the features {feats}: one compression field "
                                      "per feature is supported; give each feature its own table config")
        names.append(feats[0])
        cards.append(int(c.num_embeddings))
        dims.add(int(c.embedding_dim))
        if bags:
            pool = str(getattr(c.pooling, "name", c.pooling)).upper()
            if pool not in POOLINGS:
                raise NotImplementedError(f"table {c.name!r} pools with {pool}: only SUM and MEAN are supported")
            pools.append(pool)
    if len(dims) != 1:
        raise NotImplementedError(f"the tables have embedding_dim {sorted(dims)}: the compression table has one "
                                  "embedding_dim D for every feature (OptEmbed searches the per-feature dims itself)")
    dim = dims.pop()
    sources = [_source_weight(collection, c, bags) for c in configs]
    device = next((w.device for w in sources if w is not None and w.device.type != "meta"), torch.device("cpu"))
    table = make_table(method, cards, dim, local_ids=True, field_names=names, dataset="torchrec", **kwargs)
    table = table.to(device)
    if copy_weights and all(w is not None and w.device.type != "meta" for w in sources):
        with torch.no_grad():
            _copy_table(torch.cat([w.detach().to(device, torch.float32) for w in sources]), table, True)
    if bags:
        return TorchRecEmbeddingBagCollection(table, names, pools, max_values=max_values,
                                              is_weighted=bool(collection.is_weighted()))
    return TorchRecEmbeddingCollection(table, names, max_values=max_values)


def replace_embeddings(model: nn.Module, method="optembed", *, max_values: int = 1, copy_weights: bool = True,
                       embed_dim: int | None = None, **kwargs) -> list[EmbeddingModule]:
    """Replace every TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection`` of ``model`` in place by
    :func:`from_torchrec`; returns the new compression tables (each inside its collection, ``<name>.table``).

    ``embed_dim``, when given, must equal the collections' (the model's layers are built for it).
    """
    found = find_collections(model)
    if not found:
        sharded = [n for n, m in model.named_modules() if _is_sharded_collection(m)]
        if sharded:
            raise TypeError(f"{sharded} are sharded TorchRec collections: replace the tables before sharding")
        raise ValueError("model has no TorchRec EmbeddingBagCollection or EmbeddingCollection")
    if any(n == "" for n, _ in found):
        raise ValueError("model is itself a TorchRec collection: use from_torchrec(model) and put the result in "
                         "its place")
    tables = []
    for name, old in found:
        new = from_torchrec(old, method, max_values=max_values, copy_weights=copy_weights, **kwargs)
        if embed_dim is not None and int(embed_dim) != new.embed_dim:
            raise ValueError(f"{name!r} has embedding_dim {new.embed_dim}; the model's layers are built for it, got "
                             f"embed_dim={embed_dim}")
        _set_submodule(model, name, new)
        tables.append(new.table)
    return tables


def local_ids_to_kjt(ids: torch.Tensor, feature_names: Sequence[str]):
    """Single-valued per-feature local ids ``(B, F)`` -> the ``KeyedJaggedTensor`` a TorchRec model takes."""
    torchrec = _require_torchrec()
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != len(feature_names):
        raise ValueError(f"ids must be a (B, {len(feature_names)}) tensor, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    B, F = ids.shape
    return torchrec.KeyedJaggedTensor(keys=[str(n) for n in feature_names], values=ids.t().reshape(-1).long(),
                                      lengths=torch.ones(F * B, dtype=torch.int32, device=ids.device))


class IdInput(nn.Module):
    """``model`` (which takes a ``KeyedJaggedTensor``) fed single-valued per-feature local ids ``(B, F)``: what
    :func:`~optembed_ext.integrations.search_dims` and other ``(B, F)`` tools pass. ``feature_names`` in column
    order."""

    def __init__(self, model: nn.Module, feature_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.feature_names = [str(n) for n in feature_names]

    def forward(self, ids: torch.Tensor):
        return self.model(local_ids_to_kjt(ids, self.feature_names))
