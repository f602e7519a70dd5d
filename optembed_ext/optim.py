"""Fused sparse optimizers for embedding tables: update only the rows a batch touched.

A lookup into an ``(N, D)`` table touches ``M = B * F`` rows per batch. With a sparse gradient (``nn.Embedding(
sparse=True)``, ``F.embedding(..., sparse=True)`` or :func:`optembed_ext.ops.masked_embedding` with
``sparse=True``) the gradient is an *uncoalesced* COO tensor: one ``(D,)`` value row per looked-up position, the same
row index possibly repeated. The optimizers here hand those rows straight to :func:`optembed_ext.ops.sparse_row_update`
(``torch.ops.optembed.sparse_row_update``), which sums the duplicates per row (a segment reduction in ascending
position order, deterministic) and applies the update to each touched row and its optimizer state in one pass. A
step therefore costs ``O(B * F * D)``, never ``O(N * D)``: no ``coalesce()``, no dense gradient, no full-table state
sweep -- the scheme of FBGEMM's table-batched embedding optimizers.

Update rules (``g`` = summed gradient of row ``r`` plus ``weight_decay * w[r]``; rows not touched are left alone,
their state included):

- ``"sgd"`` (:class:`SparseSGD`): ``w[r] -= lr * g``.
- ``"adagrad"`` (:class:`RowWiseAdagrad`, FBGEMM's ``EXACT_ROWWISE_ADAGRAD``): one accumulator per row,
  ``a[r] += mean(g ** 2)``; ``w[r] -= lr * g / (sqrt(a[r]) + eps)``. State: ``(N,)`` instead of ``(N, D)``.
- ``"adam"`` (:class:`LazyAdam`): ``torch.optim.Adam``'s formula (bias correction with the optimizer's global step
  count ``t``) applied to the touched rows only: ``m[r], v[r]`` are updated only when row ``r`` is in the batch.

Weight decay. By default ``weight_decay`` acts on the touched rows only, where a dense optimizer decays every row at
every step (dense Adam moves a row it never sees by up to ``lr`` per step, which is how rarely seen rows shrink and
fall below a pruning threshold). ``lazy_weight_decay=True`` keeps the step of each row's last update (``last_step``,
one int64 per row) and, when a row is next touched, first catches it up on the steps it skipped
(:func:`optembed_ext.ops.sparse_row_update`): exactly for SGD (``w *= (1 - lr * wd) ** k``), approximately for
row-wise Adagrad and Adam (:func:`optembed_ext.reference.lazy_decay_catch_up` states the approximation).
:meth:`FusedSparseOptimizer.catch_up` brings every row up to date, e.g. before evaluating, pruning or exporting.

Parameters must be contiguous 2-D tables; a 1-D parameter (e.g. the packed storage of
:class:`~optembed_ext.nn.CompactEmbedding`) is treated as a table of one column, so its rules act per entry. A
parameter that receives a *dense* gradient (a module without sparse gradients) is still handled: the rows with a
non-zero gradient are gathered and updated (this scan costs ``O(N * D)``; enable sparse gradients to avoid it).

Typical use, as the trainer does for ``optimizer="fused_adam"``: the table with the fused optimizer, everything else
with dense Adam::

    emb = UniformEmbedding(feature_map, 16, sparse=True)
    table_opt = LazyAdam(emb.sparse_parameters(), lr=1e-3)
    dense_opt = torch.optim.Adam([p for p in model.parameters() if p is not emb.weight], lr=1e-3)

:class:`FusedBackwardOptimizer` goes one step further (FBGEMM's table-batched embeddings): the update is applied
inside the masked lookup's backward (:func:`optembed_ext.ops.masked_embedding`), so not even the per-lookup gradient
rows are written; its ``step()`` only catches gradients that reached the table by another path::

    table_opt = FusedBackwardOptimizer([emb.weight], kind="sgd", lr=1e-2)   # registers the table
    loss.backward()          # the touched rows of emb.weight are updated here; thresholds get their gradient
    table_opt.step()         # hyper-parameter changes take effect; any other gradient of the table is applied

State dicts follow ``torch.optim.Optimizer`` (``state_dict`` / ``load_state_dict``), so checkpoints resume exactly.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch

__all__ = ["KINDS", "FusedSparseOptimizer", "SparseSGD", "RowWiseAdagrad", "LazyAdam", "make_fused_optimizer",
           "FusedBackwardOptimizer", "fused_backward_factory"]

#: the update rules of :func:`optembed_ext.ops.sparse_row_update`
KINDS = ("sgd", "adagrad", "adam")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Optimizer-state dtype of a table of ``dtype`` (float64 stays float64, everything else accumulates in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_number(name: str, value, *, low: float | None = None, low_open: bool = False, high: float | None = None,
                  high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return float(value)


class FusedSparseOptimizer(torch.optim.Optimizer):
    """Row-sparse SGD / row-wise Adagrad / lazy Adam for embedding tables, fused into one kernel per table.

    Args:
        params: contiguous 2-D parameters (embedding tables; 1-D ones count as one column) or parameter groups
            (dicts with ``params`` and optionally ``lr``, ``eps``, ``betas``, ``weight_decay``).
        kind: ``"sgd"``, ``"adagrad"`` (row-wise) or ``"adam"`` (lazy), see the module docstring.
        lr: learning rate (>= 0).
        eps: term added to the denominator (> 0; used by adagrad and adam).
        betas: Adam's ``(beta1, beta2)``, each in ``[0, 1)``.
        weight_decay: L2 penalty added to the gradient of the touched rows (>= 0).
        initial_accumulator_value: starting value of the row-wise Adagrad accumulator (>= 0).
        lazy_weight_decay: defer the decay of rows a step does not touch to their next update (or
            :meth:`catch_up`), as described in the module docstring; off by default.

    ``step()`` reads ``p.grad`` of every parameter: a sparse COO gradient (coalesced or not; its value rows are
    passed to the kernel as they are, duplicates summed there) or a dense one (rows with a non-zero gradient are
    updated). State per parameter: ``step`` (int) and, for adagrad, ``sum`` ``(N,)``; for adam ``exp_avg`` and
    ``exp_avg_sq`` ``(N, D)``; both in float32 (float64 for float64 tables); with ``lazy_weight_decay``
    ``last_step`` ``(N,)`` int64.
    """

    def __init__(self, params: Iterable, kind: str = "adam", lr: float = 1e-3, eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, lazy_weight_decay: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(lazy_weight_decay, bool):
            raise TypeError(f"lazy_weight_decay must be a bool, got {type(lazy_weight_decay).__name__}")
        self.kind = kind
        self.lazy_weight_decay = lazy_weight_decay
        self.initial_accumulator_value = _check_number("initial_accumulator_value", initial_accumulator_value, low=0)
        self._warned_dense = False
        defaults = {"lr": lr, "eps": eps, "betas": betas, "weight_decay": weight_decay}
        self._check_hyper(defaults, "")
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------ checks
    @staticmethod
    def _check_hyper(group: dict, where: str) -> None:
        _check_number(f"lr{where}", group["lr"], low=0)
        _check_number(f"eps{where}", group["eps"], low=0, low_open=True)
        _check_number(f"weight_decay{where}", group["weight_decay"], low=0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas{where} must be a pair (beta1, beta2), got {betas!r}")
        _check_number(f"betas[0]{where}", betas[0], low=0, high=1, high_open=True)
        _check_number(f"betas[1]{where}", betas[1], low=0, high=1, high_open=True)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], f" (parameter group {len(self.param_groups) - 1})")
        except (TypeError, ValueError):
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _check_group(self, group: dict, where: str) -> None:
        self._check_hyper(group, where)
        for p in group["params"]:
            if p.dim() not in (1, 2):
                raise ValueError(f"{type(self).__name__} updates rows of 2-D embedding tables (or entries of 1-D "
                                 f"ones); got a parameter of shape {tuple(p.shape)}{where}")
            if not p.is_floating_point():
                raise TypeError(f"{type(self).__name__} needs floating-point parameters, got {p.dtype}{where}")
            if not p.is_contiguous():
                raise ValueError(f"{type(self).__name__} updates tables in place and needs contiguous parameters; "
                                 f"got a non-contiguous one of shape {tuple(p.shape)}{where}")

    # ------------------------------------------------------------------------------------------- state
    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if state:
            return state
        acc = _acc_dtype(p.dtype)
        state["step"] = 0
        if self.kind == "adagrad":
            state["sum"] = torch.full((p.shape[0],), self.initial_accumulator_value, dtype=acc, device=p.device)
        elif self.kind == "adam":
            state["exp_avg"] = torch.zeros(p.shape, dtype=acc, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=acc, device=p.device)
        if self.lazy_weight_decay:
            state["last_step"] = torch.zeros((p.shape[0],), dtype=torch.long, device=p.device)
        return state

    def _state_tensors(self, table: torch.Tensor, state: dict):
        if self.kind == "adagrad":
            return state["sum"], None
        if self.kind == "adam":
            return state["exp_avg"].view(table.shape), state["exp_avg_sq"].view(table.shape)
        return None, None

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict` of an optimizer of the same ``kind``."""
        groups = state_dict.get("param_groups", [])
        for i, g in enumerate(groups):
            kind = g.get("kind", self.kind)
            if kind != self.kind:
                raise ValueError(f"state_dict was saved by a {kind!r} optimizer (parameter group {i}), this one is "
                                 f"{self.kind!r}")
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype; the state lives in the accumulation dtype.
        for p, state in self.state.items():
            acc = _acc_dtype(p.dtype)
            for key in ("sum", "exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(device=p.device, dtype=acc).contiguous()
            if "last_step" in state:
                state["last_step"] = state["last_step"].to(device=p.device, dtype=torch.long).contiguous()
            elif self.lazy_weight_decay and "step" in state:  # saved without lazy decay: every row is up to date
                state["last_step"] = torch.full((p.shape[0],), int(state["step"]), dtype=torch.long,
                                                device=p.device)
            if "step" in state:
                state["step"] = int(state["step"])

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g["kind"] = self.kind
        return sd

    # -------------------------------------------------------------------------------------------- step
    def _rows(self, p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices (M,), grad_rows (M, D))`` of a parameter's gradient (``D = 1`` for a 1-D parameter), without
        coalescing."""
        if grad.shape != p.shape:
            raise ValueError(f"gradient of shape {tuple(grad.shape)} does not match its parameter {tuple(p.shape)}")
        if grad.layout == torch.sparse_coo:
            if grad.sparse_dim() != 1 or grad.dense_dim() != p.dim() - 1:
                raise ValueError(f"{type(self).__name__} expects a row-sparse gradient (sparse_dim 1, dense_dim "
                                 f"{p.dim() - 1}, as produced by sparse embedding lookups); got sparse_dim "
                                 f"{grad.sparse_dim()}, dense_dim {grad.dense_dim()}")
            indices = grad._indices()[0]
            values = grad._values().reshape(-1, 1) if p.dim() == 1 else grad._values()
        elif grad.layout == torch.strided:
            if not self._warned_dense:
                warnings.warn(f"{type(self).__name__}: a table of shape {tuple(p.shape)} got a dense gradient; the "
                              "rows with a non-zero gradient are updated, which scans the whole table. Enable sparse "
                              "gradients on the embedding module to avoid the scan.", RuntimeWarning, stacklevel=3)
                self._warned_dense = True
            grad = grad.reshape(p.shape[0], -1)
            indices = grad.ne(0).any(dim=1).nonzero().squeeze(1)
            values = grad.index_select(0, indices)
        else:
            raise TypeError(f"{type(self).__name__} cannot use a gradient with layout {grad.layout}")
        if values.dtype != p.dtype:
            values = values.to(p.dtype)
        return indices, values.contiguous()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One update of the touched rows of every parameter with a gradient; returns ``closure()`` if given."""
        from . import ops

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                indices, rows = self._rows(p, p.grad)
                state = self._init_state(p)
                state["step"] += 1
                table = p.view(p.shape[0], -1)  # a 1-D parameter is a table of one column
                state1, state2 = self._state_tensors(table, state)
                ops.sparse_row_update(table, indices, rows, state1, state2, optimizer=self.kind, lr=float(group["lr"]),
                                      eps=float(group["eps"]), beta1=float(beta1), beta2=float(beta2),
                                      weight_decay=float(group["weight_decay"]), step=int(state["step"]),
                                      last_step=state.get("last_step"))
        return loss

    @torch.no_grad()
    def catch_up(self) -> None:
        """Lazy weight decay: apply to every row the decay steps it skipped since its last update, so that the
        tables are what they would be had every row been decayed at every step (exact for SGD). A no-op without
        ``lazy_weight_decay``. Costs ``O(N * D)``: call it before evaluating, pruning, exporting or saving the
        tables, not every step."""
        from . import ops

        if not self.lazy_weight_decay:
            return
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "last_step" not in state:
                    continue
                table = p.view(p.shape[0], -1)
                state1, state2 = self._state_tensors(table, state)
                ops.lazy_decay_catch_up(table, state["last_step"], state1, state2, optimizer=self.kind,
                                        lr=float(group["lr"]), eps=float(group["eps"]), beta1=float(beta1),
                                        beta2=float(beta2), weight_decay=float(group["weight_decay"]),
                                        step=int(state["step"]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, groups={len(self.param_groups)})"


class SparseSGD(FusedSparseOptimizer):
    """Row-sparse SGD (no momentum): ``w[r] -= lr * (g + weight_decay * w[r])`` for every touched row."""

    def __init__(self, params: Iterable, lr: float = 1e-2, weight_decay: float = 0.0,
                 lazy_weight_decay: bool = False):
        super().__init__(params, kind="sgd", lr=lr, weight_decay=weight_decay, lazy_weight_decay=lazy_weight_decay)


class RowWiseAdagrad(FusedSparseOptimizer):
    """Row-wise Adagrad (one accumulator per row, FBGEMM's ``EXACT_ROWWISE_ADAGRAD``) on the touched rows."""

    def __init__(self, params: Iterable, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, lazy_weight_decay: bool = False):
        super().__init__(params, kind="adagrad", lr=lr, eps=eps, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, lazy_weight_decay=lazy_weight_decay)


class LazyAdam(FusedSparseOptimizer):
    """Adam (torch.optim.Adam's formula, L2 weight decay) applied to the touched rows only; others keep their state."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, lazy_weight_decay: bool = False):
        super().__init__(params, kind="adam", lr=lr, eps=eps, betas=betas, weight_decay=weight_decay,
                         lazy_weight_decay=lazy_weight_decay)


_CLASSES = {"sgd": SparseSGD, "adagrad": RowWiseAdagrad, "adam": LazyAdam}


def make_fused_optimizer(kind: str, params: Iterable, **kwargs) -> FusedSparseOptimizer:
    """The fused optimizer of ``kind`` (``"sgd"``, ``"adagrad"``, ``"adam"``) over ``params``."""
    if kind not in _CLASSES:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _CLASSES[kind](params, **kwargs)


class FusedBackwardOptimizer(FusedSparseOptimizer):
    """SGD / row-wise Adagrad / lazy Adam applied inside the backward of the masked lookup (no gradient rows).

    Same arguments, rules and state as :class:`FusedSparseOptimizer`. Each 2-D table is registered with
    :func:`optembed_ext.ops.fuse_update`: from then on every :func:`optembed_ext.ops.masked_embedding` lookup into
    it (any module that calls it, e.g. :class:`~optembed_ext.nn.OptEmbedEmbedding`) updates the touched rows in its
    backward pass, deduplicated and in a fixed order, and leaves ``weight.grad`` alone. ``step()`` then only makes
    changed hyper-parameters (``lr`` of a scheduler) effective for the next backward and applies, as
    :class:`FusedSparseOptimizer` does, any gradient the table received otherwise (a regulariser, a 1-D parameter
    or a lookup without autograd fusion). ``detach()`` unregisters the tables.
    """

    def __init__(self, params: Iterable, kind: str = "sgd", lr: float = 1e-2, eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, lazy_weight_decay: bool = False):
        super().__init__(params, kind=kind, lr=lr, eps=eps, betas=betas, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, lazy_weight_decay=lazy_weight_decay)
        from . import ops

        self._fused: list[tuple[torch.Tensor, dict, ops.RowUpdate]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    continue  # not a table a masked lookup reads: handled by step() as FusedSparseOptimizer
                beta1, beta2 = group["betas"]
                upd = ops.RowUpdate(p.detach(), kind, lr=group["lr"], eps=group["eps"], betas=(beta1, beta2),
                                    weight_decay=group["weight_decay"],
                                    initial_accumulator_value=self.initial_accumulator_value,
                                    lazy_weight_decay=lazy_weight_decay)
                state = self.state[p]
                state["step"] = 0
                if kind == "adagrad":
                    state["sum"] = upd.state1
                elif kind == "adam":
                    state["exp_avg"], state["exp_avg_sq"] = upd.state1, upd.state2
                if lazy_weight_decay:
                    state["last_step"] = upd.last_step
                ops.fuse_update(p, upd)
                self._fused.append((p, group, upd))
        self._seen = [upd.step for _, _, upd in self._fused]  # RowUpdate steps at the last step() (stall check)
        self._warned_stall = False

    def _sync(self, to_updates: bool) -> None:
        for p, group, upd in self._fused:
            state = self.state[p]
            if to_updates:
                upd.step = int(state["step"])
                upd.state1 = state.get("sum", state.get("exp_avg"))
                upd.state2 = state.get("exp_avg_sq")
                upd.last_step = state.get("last_step")
                upd.lr, upd.eps, upd.weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
                upd.beta1, upd.beta2 = (float(b) for b in group["betas"])
            else:
                state["step"] = upd.step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Applies the gradients that reached the tables outside the fused backward and makes hyper-parameter
        changes effective; returns ``closure()`` if given (its backward updates the tables)."""
        stalled = [p for (p, _, upd), seen in zip(self._fused, self._seen) if upd.step == seen and p.grad is None]
        if closure is None and stalled and not self._warned_stall:
            self._warned_stall = True
            warnings.warn(f"{len(stalled)} table(s) of this FusedBackwardOptimizer received no fused backward since "
                          "the last step(), so they were not updated: no masked lookup into them ran with autograd "
                          "(a graph compiled by torch.compile does not apply fused updates: run the embedding "
                          "module eagerly, or use the fused_* optimizers that step after the backward)", stacklevel=2)
        self._sync(to_updates=False)
        loss = super().step(closure)
        self._sync(to_updates=True)
        self._seen = [upd.step for _, _, upd in self._fused]
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # load_state_dict rebuilds the param groups and state: point the registered updates at them
        groups = [g for g in self.param_groups for _ in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = {id(p): g for p, g in zip(params, groups)}
        self._fused = [(p, by_id[id(p)], upd) for p, _, upd in self._fused]
        self._sync(to_updates=True)
        self._seen = [upd.step for _, _, upd in self._fused]

    def state_dict(self) -> dict:
        self._sync(to_updates=False)
        return super().state_dict()

    @torch.no_grad()
    def catch_up(self) -> None:
        self._sync(to_updates=False)
        super().catch_up()

    catch_up.__doc__ = FusedSparseOptimizer.catch_up.__doc__

    def detach(self) -> None:
        """Stop applying this optimizer in the backward of the tables' lookups (they get gradients again)."""
        from . import ops

        for p, _, upd in self._fused:
            if ops.fused_update_of(p) is upd:
                ops.fuse_update(p, None)
        self._fused = []
        self._seen = []


def fused_backward_factory(kind: str, lazy_weight_decay: bool | None = None) -> Callable:
    """Trainer optimizer factory ``(dense_groups, sparse_groups, config) -> [optimizers]`` of the fused-backward
    ``kind``: the embedding tables (sparse groups) with :class:`FusedBackwardOptimizer`, every other parameter with
    dense Adam (``config.lr``, ``config.weight_decay``). ``lazy_weight_decay``: None takes
    ``config.lazy_weight_decay`` when the config has it (else off)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def make(dense: list, sparse: list, config) -> list:
        lazy = bool(getattr(config, "lazy_weight_decay", False)) if lazy_weight_decay is None else lazy_weight_decay
        opts: list[torch.optim.Optimizer] = []
        if dense:
            opts.append(torch.optim.Adam(dense, lr=config.lr, weight_decay=config.weight_decay))
        if sparse:
            opts.append(FusedBackwardOptimizer([{"params": g["params"], "lr": g["lr"],
                                                 "weight_decay": g["weight_decay"]} for g in sparse], kind=kind,
                                               lazy_weight_decay=lazy))
        return opts

    return make
