"""Compression tables in any model: the evolutionary dims search on foreign models and the generic table swap.

:func:`search_dims` runs OptEmbed's evolutionary search (:mod:`optembed_ext.search.evolution`) on any model that
holds an OptEmbed table; :func:`replace_embeddings` swaps a foreign model's tables (DeepCTR-Torch, torchfm, or a
named ``nn.Embedding``). Both sit above the search schedules, beside the library adapters.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..nn.base import EmbeddingModule
from ..nn.plugin import _copy_table, _optembed_modules, _set_submodule, make_table
from ..search.evolution import EvolutionConfig, EvolutionSearch, evaluate_one_at_a_time
from . import deepctr as _deepctr
from . import torchfm as _torchfm
from . import torchrec as _torchrec

__all__ = ["replace_embeddings", "search_dims"]


def _as_split(val_data):
    if hasattr(val_data, "X") and hasattr(val_data, "y"):
        return val_data
    if isinstance(val_data, (tuple, list)) and len(val_data) == 2:
        X, y = val_data
        X = X.detach().cpu() if isinstance(X, torch.Tensor) else np.asarray(X)
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        return SimpleNamespace(X=X, y=np.asarray(y, dtype=np.float64).reshape(-1))
    raise TypeError("val_data must be a CTRSplit (X, y attributes) or an (X, y) pair")


class _ModelView(nn.Module):
    """A foreign model seen by the evolutionary search: ``embedding`` is the searched table, ``forward`` the model's
    (probabilities are fine: the search ranks by AUC, which a monotonic sigmoid leaves unchanged)."""

    def __init__(self, model: nn.Module, embedding):
        super().__init__()
        self.model = model
        self.__dict__["embedding"] = embedding  # not a submodule: it already lives inside model

    def forward(self, x):
        out = self.model(x)
        return out.reshape(out.shape[0], -1)[:, 0] if out.dim() > 1 else out


def search_dims(model: nn.Module, val_data, *, embedding=None, generations: int = 10, mutation_num: int = 10,
                crossover_num: int = 10, keep_num: int = 0, m_prob: float = 0.1, seed: int = 0,
                batch_size: int = 4096, device=None, batched: bool | None = None, log=None) -> dict:
    """OptEmbed's evolutionary search of the field dimensions of ``model``'s OptEmbed table, on ``val_data``.

    ``val_data`` is a :class:`~optembed_ext.data.CTRSplit` or an ``(X, y)`` pair whose ``X`` is what ``model``
    takes. Candidates are evaluated in a batch (one lookup shared by the population) when the model offers
    ``predict_from_embeddings`` and ``embedding`` (the models of :mod:`optembed_ext.models`), otherwise one full
    forward per candidate (any model). ``embedding`` picks the table when the model has several.

    Returns ``{"field_dims": [...], "val_auc": float, "num_params": int, "history": [...], "batched": bool}``.
    """
    if embedding is None:
        mods = _optembed_modules(model)
        if len(mods) != 1:
            raise ValueError(f"model has {len(mods)} OptEmbedEmbedding modules: pass embedding=")
        embedding = mods[0]
    if device is None:
        device = embedding.weight.device
    split = _as_split(val_data)
    can_batch = hasattr(model, "predict_from_embeddings") and getattr(model, "embedding", None) is embedding
    if batched is None:
        batched = can_batch
    elif batched and not can_batch:
        raise ValueError("batched search needs model.predict_from_embeddings and model.embedding")
    view = model if batched else _ModelView(model, embedding)
    config = EvolutionConfig(generations=generations, mutation_num=mutation_num, crossover_num=crossover_num,
                             keep_num=keep_num, m_prob=m_prob, seed=seed, eval_batch_size=batch_size)

    class _OneAtATime(EvolutionSearch):
        def _evaluate(self, cands, cache):
            keys = [tuple(int(v) for v in c) for c in cands]
            todo = []
            for k in keys:
                if k not in cache and k not in todo:
                    todo.append(k)
            if todo:
                res = evaluate_one_at_a_time(self.model, self.split, np.array(todo, dtype=np.int64),
                                             batch_size=self.config.eval_batch_size, device=self.device)
                for k, a in zip(todo, res["auc"]):
                    cache[k] = a
            return [cache[k] for k in keys], len(todo)

    was_training = model.training
    saved_sampling = getattr(embedding, "sample_dims", False)
    embedding.sample_dims = False
    try:
        search_cls = EvolutionSearch if batched else _OneAtATime
        result = search_cls(view, split, config, device=device, log=log).run(resume=False)
    finally:
        embedding.set_dims(None)
        embedding.sample_dims = saved_sampling
        model.train(was_training)
    return {"field_dims": [int(d) for d in result["best_dims"]], "val_auc": float(result["best_val_auc"]),
            "num_params": result["num_params"], "history": result["history"], "batched": bool(batched),
            "seconds": float(result["seconds"])}


# ---------------------------------------------------------------------------------------------- replacement
def replace_embeddings(model: nn.Module, method="optembed", *, embed_dim: int | None = None,
                       cardinalities: Sequence[int] | None = None, target: str | None = None, copy_weights: bool = True,
                       **kwargs) -> list[EmbeddingModule]:
    """Swap a foreign model's embedding tables for compression tables, in place; returns the new tables.

    * DeepCTR-Torch models (``embedding_dict``): :func:`optembed_ext.integrations.deepctr.replace_embeddings`;
    * torchfm models (``FeaturesEmbedding``): :func:`optembed_ext.integrations.torchfm.replace_embeddings`;
    * models holding TorchRec collections: :func:`optembed_ext.integrations.torchrec.replace_embeddings`;
    * otherwise the ``nn.Embedding`` at ``target`` (a submodule name) holding ``sum(cardinalities)`` rows looked
      up with global ids ``(B, F)``: replaced by a table with ``local_ids=False`` (its weights copied when the
      method keeps a full table and ``copy_weights``).

    ``kwargs`` go to the table's constructor (``alpha``, ``threshold_init``, ...).
    """
    if _deepctr.is_deepctr_model(model):
        return [_deepctr.replace_embeddings(model, method, embed_dim=embed_dim, **kwargs)]
    if _torchfm.find_features_embeddings(model):
        return _torchfm.replace_embeddings(model, method, embed_dim=embed_dim, **kwargs)
    if _torchrec.find_collections(model):
        return _torchrec.replace_embeddings(model, method, embed_dim=embed_dim, copy_weights=copy_weights, **kwargs)
    if target is None or cardinalities is None:
        raise ValueError("model is neither a DeepCTR-Torch, a torchfm nor a TorchRec model: pass target= (the name "
                         "of its nn.Embedding) and cardinalities=")
    old = model.get_submodule(target)
    if not isinstance(old, nn.Embedding):
        raise TypeError(f"{target!r} is a {type(old).__name__}, not an nn.Embedding")
    cards = [int(c) for c in cardinalities]
    if sum(cards) != old.num_embeddings:
        raise ValueError(f"sum(cardinalities) = {sum(cards)} but {target!r} has {old.num_embeddings} rows")
    dim = old.embedding_dim if embed_dim is None else int(embed_dim)
    new = make_table(method, cards, dim, local_ids=False, **kwargs).to(old.weight.device)
    _copy_table(old.weight, new, copy_weights)
    _set_submodule(model, target, new)
    return [new]
