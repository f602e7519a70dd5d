"""Optimizers of the trainer: parameter groups from the embedding module, dense / sparse / fused optimizers.

``OPTIMIZERS`` maps a ``TrainConfig.optimizer`` name to a factory ``(dense_groups, sparse_groups, config) -> list
of torch optimizers``; :func:`build_optimizer` splits a model's parameters into those groups and steps the
resulting optimizers together as one :class:`MultiOptimizer`.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .config import TrainConfig

logger = logging.getLogger(__name__)


class MultiOptimizer:
    """Several torch optimizers stepped together (e.g. SparseAdam for sparse tables + Adam for the rest)."""

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def catch_up(self) -> None:
        """Lazy weight decay: bring every table of a fused optimizer with ``lazy_weight_decay`` up to date (the
        decay steps its rows skipped); a no-op for the other optimizers. Call before evaluating or exporting."""
        for opt in self.optimizers:
            fn = getattr(opt, "catch_up", None)
            if callable(fn):
                fn()

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"optimizer state holds {len(states)} optimizers, this trainer has {len(self.optimizers)}")
        for opt, s in zip(self.optimizers, states):
            opt.load_state_dict(s)

    def __repr__(self):
        return f"MultiOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def _strip_decay(groups: list[dict], what: str) -> list[dict]:
    out = []
    for g in groups:
        g = dict(g)
        if g.pop("weight_decay", 0.0):
            logger.warning("weight decay is not applied to parameters with sparse gradients (%s)", what)
        out.append(g)
    return out


def _make_adam(dense: list[dict], sparse: list[dict], config: TrainConfig) -> list[torch.optim.Optimizer]:
    opts = []
    if dense:
        opts.append(torch.optim.Adam(dense, lr=config.lr, weight_decay=config.weight_decay))
    if sparse:
        opts.append(torch.optim.SparseAdam(_strip_decay(sparse, "SparseAdam"), lr=config.lr))
    return opts


def _make_adagrad(dense, sparse, config):
    opts = []
    if dense:
        opts.append(torch.optim.Adagrad(dense, lr=config.lr, weight_decay=config.weight_decay))
    if sparse:
        opts.append(torch.optim.Adagrad([dict(g, weight_decay=0.0) for g in _strip_decay(sparse, "Adagrad")],
                                        lr=config.lr))
    return opts


def _make_sgd(dense, sparse, config):
    opts = []
    if dense:
        opts.append(torch.optim.SGD(dense, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay))
    if sparse:
        opts.append(torch.optim.SGD([dict(g, weight_decay=0.0, momentum=0.0) for g in _strip_decay(sparse, "SGD")],
                                    lr=config.lr))
    return opts


def _lazy_decay(config: TrainConfig, lazy: bool) -> bool:
    return lazy or bool(getattr(config, "lazy_weight_decay", False))


def _make_fused(kind: str, lazy: bool = False) -> Callable[[list, list, TrainConfig], list]:
    """Factory of ``fused_<kind>``: the sparse tables with :class:`optembed_ext.optim.FusedSparseOptimizer` (only
    the touched rows are updated, O(B*F*D) per step), every other parameter with dense Adam. ``lazy`` (the
    ``*_lazywd`` names, or a config with ``lazy_weight_decay``): the tables' weight decay catches up on the steps
    a row skipped (:mod:`optembed_ext.optim`)."""

    def make(dense, sparse, config):
        from ..optim import make_fused_optimizer

        opts = []
        if dense:
            opts.append(torch.optim.Adam(dense, lr=config.lr, weight_decay=config.weight_decay))
        if sparse:
            opts.append(make_fused_optimizer(kind, [{"params": g["params"], "lr": g["lr"],
                                                     "weight_decay": g["weight_decay"]} for g in sparse],
                                             lazy_weight_decay=_lazy_decay(config, lazy)))
        return opts

    return make


def _make_fused_backward(kind: str, lazy: bool = False) -> Callable[[list, list, TrainConfig], list]:
    """Factory of ``fused_bwd_<kind>``: the sparse tables updated inside the lookup's backward
    (:class:`optembed_ext.optim.FusedBackwardOptimizer`), every other parameter with dense Adam; ``lazy`` as
    :func:`_make_fused`."""

    def make(dense, sparse, config):
        from ..optim import fused_backward_factory

        return fused_backward_factory(kind, _lazy_decay(config, lazy))(dense, sparse, config)

    return make


def _request_sparse_grad(emb: nn.Module) -> bool:
    """Switch on sparse table gradients of ``emb`` when its class supports them (a ``sparse`` constructor argument
    mirrored by the ``sparse_grad`` attribute, e.g. ``UniformEmbedding``, ``CompactEmbedding``). Returns whether
    the table gradient is sparse now."""
    if getattr(emb, "sparse_grad", False):
        return True
    supported = getattr(emb, "supports_sparse_grad", None)
    if supported is None:
        try:
            supported = "sparse" in inspect.signature(type(emb).__init__).parameters
        except (TypeError, ValueError):
            supported = False
    if supported:
        emb.sparse_grad = True
    return bool(supported)


#: optimizer name -> factory(dense_groups, sparse_groups, config) -> list of torch optimizers. The sparse groups
#: hold the parameters listed by ``embedding.sparse_parameters()`` (sparse COO gradients).
OPTIMIZERS: dict[str, Callable[[list, list, TrainConfig], list]] = {
    "adam": _make_adam,
    "sparse_adam": _make_adam,
    "adagrad": _make_adagrad,
    "sgd": _make_sgd,
    "fused_sgd": _make_fused("sgd"),
    "fused_adagrad": _make_fused("adagrad"),
    "fused_adam": _make_fused("adam"),
    # the update applied inside the masked lookup's backward (FBGEMM-style; no gradient rows are materialised)
    "fused_bwd_sgd": _make_fused_backward("sgd"),
    "fused_bwd_adagrad": _make_fused_backward("adagrad"),
    "fused_bwd_adam": _make_fused_backward("adam"),
}
# the same with lazy weight decay (rows a step does not touch are decayed on their next update; optembed_ext.optim)
for _kind in ("sgd", "adagrad", "adam"):
    OPTIMIZERS[f"fused_{_kind}_lazywd"] = _make_fused(_kind, lazy=True)
    OPTIMIZERS[f"fused_bwd_{_kind}_lazywd"] = _make_fused_backward(_kind, lazy=True)
del _kind

#: optimizers for which the trainer switches on the embedding table's sparse gradient (when the module supports it)
SPARSE_GRAD_OPTIMIZERS = frozenset(name for name in OPTIMIZERS if name.startswith("fused_"))


def build_optimizer(model: nn.Module, config: TrainConfig, extra_param_groups=None) -> MultiOptimizer:
    """The optimizer of ``model`` for ``config.optimizer``: ``model.embedding.param_groups(lr, weight_decay)``
    (at ``config.embedding_lr`` when set), the rest of the model at ``config.lr``, plus ``extra_param_groups``;
    parameters with sparse gradients go to the sparse (or fused) optimizer of that name; learned pruning
    thresholds (:func:`threshold_parameters`) to their own ``config.threshold_optimizer`` at
    ``config.threshold_lr`` (default: the module's ``threshold_lr``)."""
    cfg = config
    emb = model.embedding

    def normalise(groups, what):
        out = []
        for g in groups:
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError(f"{what} must be dicts with a 'params' entry, got {g!r}")
            g = dict(g)
            params = g["params"]
            g["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
            g.setdefault("lr", cfg.lr)
            g.setdefault("weight_decay", cfg.weight_decay)
            out.append(g)
        return out

    emb_lr = cfg.lr if cfg.embedding_lr is None else cfg.embedding_lr
    thresholds = threshold_parameters(emb)
    thr_ids = {id(p) for p in thresholds}
    emb_groups = [dict(g, lr=g.get("lr", emb_lr)) for g in emb.param_groups(emb_lr, cfg.weight_decay)]
    emb_groups = [dict(g, params=[p for p in _as_list(g["params"]) if id(p) not in thr_ids]) for g in emb_groups]
    emb_groups = [g for g in emb_groups if g["params"]]
    emb_groups = normalise(emb_groups, "embedding.param_groups()")
    extra = normalise(extra_param_groups or [], "extra_param_groups")
    seen: set[int] = set(thr_ids)
    for g in emb_groups + extra:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError("a parameter appears in more than one optimizer parameter group")
            seen.add(id(p))
    emb_ids = {id(p) for p in emb.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in emb_ids and id(p) not in seen]
    groups = emb_groups + ([{"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay}] if rest else [])
    groups += extra
    if cfg.optimizer in SPARSE_GRAD_OPTIMIZERS and not _request_sparse_grad(emb):
        logger.warning("%s: %s has no sparse gradient; its parameters use dense Adam", cfg.optimizer,
                       type(emb).__name__)
    sparse_ids = {id(p) for p in emb.sparse_parameters()}
    dense_groups, sparse_groups = [], []
    for g in groups:
        d = [p for p in g["params"] if id(p) not in sparse_ids]
        s = [p for p in g["params"] if id(p) in sparse_ids]
        if d:
            dense_groups.append(dict(g, params=d))
        if s:
            sparse_groups.append(dict(g, params=s))
    if not dense_groups and not sparse_groups and not thresholds:
        raise ValueError("the model has no trainable parameters")
    optimizers = OPTIMIZERS[cfg.optimizer](dense_groups, sparse_groups, cfg)
    if thresholds:
        lr = cfg.threshold_lr if cfg.threshold_lr is not None else float(getattr(emb, "threshold_lr", cfg.lr))
        optimizers.append(make_threshold_optimizer(thresholds, cfg.threshold_optimizer, lr))
    return MultiOptimizer(optimizers)


def _as_list(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def threshold_parameters(embedding: nn.Module) -> list[torch.Tensor]:
    """The learned pruning thresholds of an embedding module (OptEmbed's per-field ``t`` while it is learned),
    which get an optimizer of their own; empty for other modules."""
    from ..nn.optembed import OptEmbedEmbedding

    if isinstance(embedding, OptEmbedEmbedding):
        t = embedding.threshold
        if t is not None and t.requires_grad and not getattr(embedding, "frozen", False):
            return [t]
    return []


def make_threshold_optimizer(params, kind: str, lr: float) -> torch.optim.Optimizer:
    """Plain SGD (the OptEmbed authors' choice: ``t -= lr * grad``) or Adam over the thresholds, no weight
    decay."""
    params = list(params)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"threshold_optimizer must be 'sgd' or 'adam', got {kind!r}")
