"""Plug the compression tables into anyone's PyTorch CTR code: module-level helpers over a whole model.

Three lines in a plain training loop::

    emb = OptEmbedEmbedding.from_cardinalities(cards, 16)         # per-field local ids, offsets added inside
    opt = make_optimizer(model, torch.optim.Adam, lr=1e-3)         # thresholds: own SGD, no weight decay
    loss = F.binary_cross_entropy_with_logits(logits, y) + regularization(model)

* :func:`embedding_modules` -- every compression module of a model, by name;
* :func:`regularization` -- the sum of their regularisers, scaled for a mean- or sum-reduced loss;
* :func:`make_optimizer` -- any torch optimizer with the right parameter groups plus the thresholds' own
  optimizer, as one :class:`CombinedOptimizer`;
* :class:`SupernetHook` -- the OptEmbed supernet schedule in any loop (dims sampled inside ``forward``, the row mask
  of the best validation AUC kept);
* :func:`to_compact` -- every table of a model replaced by its served (compact) form, same ids in;

The dims search on any model and the swap of a foreign model's tables sit above the search schedules:
:func:`optembed_ext.integrations.search_dims`, :func:`optembed_ext.integrations.replace_embeddings`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .base import EmbeddingModule

LOSS_REDUCTIONS = ("mean", "sum")
_OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop"}


# ------------------------------------------------------------------------------------------------ discovery
def embedding_modules(model: nn.Module) -> list[tuple[str, EmbeddingModule]]:
    """``(name, module)`` of every :class:`EmbeddingModule` in ``model`` (the model itself when it is one)."""
    if isinstance(model, EmbeddingModule):
        return [("", model)]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, EmbeddingModule)]


def _optembed_modules(model) -> list:
    from .optembed import OptEmbedEmbedding

    return [m for _, m in embedding_modules(model) if isinstance(m, OptEmbedEmbedding)]


# ----------------------------------------------------------------------------------------------- regulariser
def regularization(model: nn.Module, loss_reduction: str = "mean", batch_size=None) -> torch.Tensor:
    """Sum of every compression module's regulariser in ``model``, for a loss with the given reduction.

    The modules' weights (OptEmbed's ``alpha``) are set for a batch-mean loss. With ``loss_reduction="sum"``
    (DeepCTR-Torch sums the loss over the batch) the regulariser is multiplied by ``batch_size`` (an int or a
    0-d tensor, required) so that it keeps the same weight relative to the data loss.
    """
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
    if loss_reduction == "sum":
        if batch_size is None:
            raise ValueError("loss_reduction='sum' needs batch_size (the regulariser is scaled by it)")
        if not isinstance(batch_size, torch.Tensor) and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    modules = embedding_modules(model)
    if not modules:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    total = modules[0][1].regularization()
    for _, m in modules[1:]:
        total = total + m.regularization()
    if loss_reduction == "sum":
        total = total * batch_size
    return total


# ------------------------------------------------------------------------------------------------ optimizer
class CombinedOptimizer:
    """Several torch optimizers stepped as one: ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``.

    ``optimizers`` maps a name (``"dense"``, ``"threshold"``) to an optimizer; ``param_groups`` lists every
    group (the same dicts, so a learning-rate change there reaches the optimizer that owns the group).
    """

    def __init__(self, optimizers: dict):
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = dict(optimizers)

    def __getitem__(self, name: str):
        return self.optimizers[name]

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        out = {}
        for opt in self.optimizers.values():
            out.update(opt.state)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"state_dict has optimizers {sorted(state_dict)}, expected {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={type(v).__name__}" for k, v in self.optimizers.items())
        return f"CombinedOptimizer({inner})"


def _optimizer_class(spec, what: str):
    if isinstance(spec, str):
        key = spec.lower()
        if key not in _OPTIMIZERS:
            raise ValueError(f"{what} must be one of {sorted(_OPTIMIZERS)} or a torch optimizer class, got {spec!r}")
        return getattr(torch.optim, _OPTIMIZERS[key])
    if callable(spec):
        return spec
    raise TypeError(f"{what} must be a name or a torch optimizer class, got {spec!r}")


def make_optimizer(model: nn.Module, optimizer=torch.optim.Adam, lr: float = 1e-3, weight_decay: float = 0.0, *,
                   threshold_optimizer="sgd", threshold_lr: float | None = None, embedding_lr: float | None = None,
                   **optimizer_kwargs) -> CombinedOptimizer:
    """One optimizer object for ``model`` with the parameter groups its compression tables need.

    * every parameter outside the tables: ``optimizer`` at ``lr`` / ``weight_decay``;
    * the tables' groups (:meth:`EmbeddingModule.param_groups`) at ``embedding_lr`` (default ``lr``) /
      ``weight_decay``; PEP's thresholds as its ``param_groups`` say; AutoDim/AutoField architecture weights at
      ``lr`` without weight decay (one-level search on the training loss);
    * OptEmbed's thresholds: their own ``threshold_optimizer`` (``"sgd"`` by default, as the OptEmbed authors;
      ``"adam"`` or any class) at ``threshold_lr`` (default: each module's ``threshold_lr``), no weight decay.

    * tables built with ``sparse=True``: their sparse-gradient parameters in ``["sparse"]`` (``SparseAdam`` for
      Adam/AdamW, the same class for SGD/Adagrad) at ``embedding_lr``.

    ``optimizer`` is a torch optimizer class or a name (``"adam"``, ``"sgd"``, ...); ``optimizer_kwargs`` go to it.
    Returns a :class:`CombinedOptimizer` (``["dense"]`` and, when there are thresholds, ``["threshold"]``).
    """
    from .optembed import OptEmbedEmbedding

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if threshold_lr is not None and not (isinstance(threshold_lr, (int, float)) and threshold_lr >= 0):
        raise ValueError(f"threshold_lr must be a non-negative number or None, got {threshold_lr!r}")
    dense_cls = _optimizer_class(optimizer, "optimizer")
    thr_cls = _optimizer_class(threshold_optimizer, "threshold_optimizer")
    emb_lr = lr if embedding_lr is None else float(embedding_lr)

    seen: set[int] = set()
    dense_groups: list[dict] = []
    thr_groups: list[dict] = []

    def take(params) -> list:
        out = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    sparse_params: list = []
    for _, m in embedding_modules(model):
        sparse_params += take(m.sparse_parameters())  # sparse COO gradients: an optimizer that takes them
    for _, m in embedding_modules(model):
        thr_ids = set()
        if isinstance(m, OptEmbedEmbedding) and m.threshold is not None and m.threshold.requires_grad:
            params = take([m.threshold])
            if params:
                thr_groups.append({"params": params, "lr": m.threshold_lr if threshold_lr is None else threshold_lr,
                                   "weight_decay": 0.0})
            thr_ids.add(id(m.threshold))
        for g in m.param_groups(emb_lr, weight_decay):
            params = take(p for p in g["params"] if id(p) not in thr_ids)
            if params:
                dense_groups.append(dict(g, params=params))
        arch = getattr(m, "arch_parameters", None)
        if callable(arch):
            params = take(arch())
            if params:
                dense_groups.append({"params": params, "lr": lr, "weight_decay": 0.0})
    rest = take(model.parameters())
    if rest:
        dense_groups.insert(0, {"params": rest, "lr": lr, "weight_decay": weight_decay})
    if not dense_groups and not thr_groups:
        raise ValueError("model has no trainable parameters")
    optimizers = {}
    if sparse_params:
        if dense_cls in (torch.optim.Adam, torch.optim.AdamW):
            optimizers["sparse"] = torch.optim.SparseAdam(sparse_params, lr=emb_lr)
        elif dense_cls in (torch.optim.SGD, torch.optim.Adagrad):
            optimizers["sparse"] = dense_cls(sparse_params, lr=emb_lr)
        else:
            raise ValueError(f"{dense_cls.__name__} cannot take the sparse gradients of a table built with "
                             "sparse=True: use Adam, AdamW, SGD or Adagrad, or a dense table")
    if dense_groups:
        optimizers["dense"] = dense_cls(dense_groups, lr=lr, **optimizer_kwargs)
    if thr_groups:
        optimizers["threshold"] = thr_cls(thr_groups, lr=thr_groups[0]["lr"])
    return CombinedOptimizer(optimizers)


# ------------------------------------------------------------------------------------------- supernet hook
class SupernetHook:
    """The OptEmbed supernet schedule in any training loop.

    On construction every :class:`OptEmbedEmbedding` of ``model`` samples its per-sample kept dimensions inside
    ``forward`` in training mode (``sample_dims``; nothing to call per batch). Call :meth:`update` with the
    validation AUC after each evaluation: the row masks of the best AUC are kept (:attr:`best_row_masks`).
    :meth:`freeze` fixes them (and optionally searched field dims) for retraining and stops the sampling.
    """

    def __init__(self, model: nn.Module, sample_dims: bool = True):
        self.model = model
        self.modules = _optembed_modules(model)
        if not self.modules:
            raise ValueError("model has no OptEmbedEmbedding")
        for m in self.modules:
            m.sample_dims = bool(sample_dims)
        self.best_auc = -math.inf
        self.best_step = -1
        self.best_row_masks: list[torch.Tensor] | None = None
        self.history: list[dict] = []

    def update(self, val_auc: float, step: int | None = None) -> bool:
        """Record one validation result; keep the current row masks when ``val_auc`` is the best so far."""
        auc = float(val_auc)
        step = len(self.history) if step is None else int(step)
        masks = [m.row_mask().cpu() for m in self.modules]
        self.history.append({"step": step, "val_auc": auc, "kept_rows": [int(k.sum()) for k in masks]})
        if auc > self.best_auc:
            self.best_auc, self.best_step, self.best_row_masks = auc, step, masks
            return True
        return False

    def best_row_mask(self, index: int = 0) -> torch.Tensor:
        """Row mask of module ``index`` at the best validation AUC (the current mask before any update)."""
        if self.best_row_masks is None:
            return self.modules[index].row_mask()
        return self.best_row_masks[index]

    def freeze(self, field_dims=None) -> None:
        """Freeze every module with its best row mask and ``field_dims`` (one (F,) list, or one per module)."""
        dims = field_dims
        if dims is not None and len(self.modules) > 1 and not isinstance(dims[0], (int, np.integer)):
            per = list(dims)
        else:
            per = [dims] * len(self.modules)
        for i, m in enumerate(self.modules):
            m.sample_dims = False
            m.set_dims(None)
            m.freeze(self.best_row_mask(i).to(m.weight.device), per[i])

    def close(self) -> None:
        """Stop the dims sampling (the masks stay as they are)."""
        for m in self.modules:
            m.sample_dims = False


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.ModuleDict):
        parent[attr] = new
    else:
        setattr(parent, attr, new)


def to_compact(model: nn.Module, **kwargs) -> nn.Module:
    """Replace, in place, every table of ``model`` that has a served form (``to_compact()``) by that form.

    The compact tables take the same ids and give the same outputs (evaluation mode) as the masked ones. Returns
    ``model`` (or the compact table when ``model`` is itself a table).
    """
    if isinstance(model, EmbeddingModule):
        if not hasattr(model, "to_compact"):
            raise TypeError(f"{type(model).__name__} has no compact form")
        return model.to_compact(**kwargs)
    for name, m in embedding_modules(model):
        if hasattr(m, "to_compact"):
            _set_submodule(model, name, m.to_compact(**kwargs))
    return model


METHODS = ("optembed", "pep", "autodim", "uniform")


def make_table(method, cardinalities: Sequence[int], embed_dim: int, *, local_ids: bool = True, **kwargs):
    """A compression table by name (``"optembed"``, ``"pep"``, ``"autodim"``, ``"uniform"``) or class, built from
    field cardinalities with :meth:`EmbeddingModule.from_cardinalities`."""
    from . import AutoDimEmbedding, OptEmbedEmbedding, PEPEmbedding, UniformEmbedding

    classes = {"optembed": OptEmbedEmbedding, "pep": PEPEmbedding, "autodim": AutoDimEmbedding,
               "uniform": UniformEmbedding}
    if isinstance(method, str):
        if method not in classes:
            raise ValueError(f"method must be one of {METHODS} or an EmbeddingModule class, got {method!r}")
        cls = classes[method]
    elif isinstance(method, type) and issubclass(method, EmbeddingModule):
        cls = method
    else:
        raise TypeError(f"method must be a name or an EmbeddingModule class, got {method!r}")
    if cls is AutoDimEmbedding and "candidates" not in kwargs:
        kwargs["candidates"] = [d for d in (2, 4, 8, 16, 32, 64) if d <= embed_dim] or [embed_dim]
        kwargs.setdefault("transform", "zero_pad")
    return cls.from_cardinalities(list(cardinalities), embed_dim, local_ids=local_ids, **kwargs)


@torch.no_grad()
def _copy_table(weight: torch.Tensor, table: nn.Module, copy_weights: bool) -> None:
    w = getattr(table, "weight", None)
    if copy_weights and isinstance(w, nn.Parameter) and tuple(w.shape) == tuple(weight.shape):
        w.copy_(weight)


def describe(model: nn.Module) -> list[dict]:
    """Size figures of every table of ``model``: name, kind, parameters kept, sparsity."""
    out = []
    for name, m in embedding_modules(model):
        out.append({"name": name, "kind": type(m).__name__, "num_params": int(m.num_params()),
                    "dense_size": int(m.dense_size()), "sparsity": float(m.sparsity())})
    return out


def sparsity(model: nn.Module) -> float:
    """``1 - kept / dense`` over every table of ``model``."""
    mods = embedding_modules(model)
    if not mods:
        raise ValueError("model has no EmbeddingModule")
    kept = sum(int(m.num_params()) for _, m in mods)
    dense = sum(int(m.dense_size()) for _, m in mods)
    return 1.0 - kept / float(dense)


__all__ = ["embedding_modules", "regularization", "CombinedOptimizer", "make_optimizer", "SupernetHook",
           "to_compact", "make_table", "describe", "sparsity"]

