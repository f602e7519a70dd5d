"""Fused ops for learned embedding compression (``torch.ops.optembed.*``) with autograd and fake kernels.

Public functions (same names and signatures in :mod:`optembed_ext.reference`, the pure-PyTorch reference):

- :func:`masked_embedding`   OptEmbed lookup: gather + row p-norm + learned field threshold (long-tail STE) +
  OOV blend + per-sample kept-dimension prefix, one pass forward and backward.
- :func:`row_mask`           which table rows survive the learned per-field thresholds.
- :func:`compact_embedding`  mixed-dimension lookup over the per-field compact tables of a searched model.
- :func:`sparse_row_update`  fused sparse optimizer step (SGD / row-wise Adagrad / lazy Adam) on touched rows.

Every op validates its arguments in Python (raising ``TypeError``/``ValueError`` that names the argument) and
dispatches through the torch dispatcher to the compiled CPU/CUDA kernels. Checks that need the data (index
ranges with ``check_indices=True``, ``dims`` ranges, NaN thresholds) happen inside the kernels' main pass (no
extra pass over the data) and surface as ``IndexError``/``ValueError`` naming the argument: every out-of-range id
raises ``IndexError`` (every op, every backend), and the position reported is always the first bad one, whatever
the thread count. Data checks look at the lookups only (a call without lookups checks nothing). On CUDA the kernel
records the first bad position in a device flag that the host reads after the launch, so a checked call
synchronises with the device once; ``check_indices=False`` skips the checks and the synchronisation.

Unchecked calls (``check_indices=False``) mean the caller promises valid ids, but no path ever reads or writes
outside a table: an out-of-range id (any 64-bit value) yields a zero output row and no gradient (the CPU
``masked_embedding`` backward, which checks its ids anyway, raises ``IndexError``), out-of-range ``dims`` are
clamped to ``[0, D]``, and ``sparse_row_update`` skips out-of-range ids.

Non-finite values behave as IEEE arithmetic on the formulas, identically in the CPU kernel, the CUDA kernel and the
reference (see :func:`masked_embedding`): NaN propagates, ``+-inf`` thresholds prune / keep a whole field.

The compiled ops have ``torch.library.register_fake`` kernels (``torch.compile(fullgraph=True)`` traces through
them) and ``torch.library.register_autograd`` formulas whose backward calls the matching ``*_backward`` op.
The flags that only matter for the backward pass (``deterministic``, ``sparse``) are carried by two thin Python
custom ops, ``optembed::masked_embedding`` and ``optembed::compact_embedding``, over the compiled forward ops.

When the compiled extension is missing (``optembed_ext._ext.HAS_EXTENSION`` is False, a warning is emitted
once), when it has no kernel for the tensors' device, or when :func:`use_reference` / ``OPTEMBED_USE_REFERENCE=1``
asks for it, every function runs its reference instead.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import _ext
from . import reference as _ref

__all__ = ["masked_embedding", "row_mask", "compact_embedding", "sparse_row_update", "lazy_decay_catch_up",
           "use_reference",
           "has_kernel", "COMPILED_OPS", "RowUpdate", "fuse_update", "fused_update_of"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_force_reference: Optional[bool] = None


# ============================================================================================== dispatch helpers
def use_reference(flag: Optional[bool] = None) -> bool:
    """Force (``True``) or stop forcing (``False``) the pure-PyTorch reference; returns the current setting.

    ``use_reference(None)`` only queries. Without an explicit setting the environment variable
    ``OPTEMBED_USE_REFERENCE=1`` decides.
    """
    global _force_reference
    if flag is not None:
        if not isinstance(flag, bool):
            raise TypeError(f"flag must be a bool or None, got {type(flag).__name__}")
        _force_reference = flag
    return _force_reference if _force_reference is not None else _ext.env_use_reference()


# (op, device type) -> whether the compiled extension has a kernel; filled once at import (plain dict lookups
# keep the dispatch decision traceable by torch.compile).
_KERNELS: dict[tuple[str, str], bool] = {}
COMPILED_OPS = ("masked_embedding_forward", "masked_embedding_backward", "masked_embedding_backward_update",
                "row_mask", "compact_embedding_forward", "compact_embedding_backward", "sparse_row_update")
_COMPILED_OPS = COMPILED_OPS


def _scan_kernels() -> None:
    for op in _COMPILED_OPS:
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            try:
                found = torch._C._dispatch_has_kernel_for_dispatch_key(f"optembed::{op}", key)
            except RuntimeError:  # op not registered by this build
                found = False
            _KERNELS[(op, device_type)] = bool(found)
        _KERNELS[(op, "meta")] = True  # fake kernels (register_fake)


def has_kernel(op: str, device) -> bool:
    """Whether the compiled extension has a kernel of ``optembed::<op>`` (a name of :data:`COMPILED_OPS`) for
    ``device`` (a ``torch.device`` or its type, ``"cpu"`` / ``"cuda"``)."""
    device_type = device if isinstance(device, str) else device.type
    return _KERNELS.get((op, device_type), False)


def _reference_path(op: str, device: torch.device) -> bool:
    if use_reference():
        return True
    if not _ext.HAS_EXTENSION:
        if device.type == "cuda" and _ext.cuda_required():
            raise RuntimeError(f"optembed_ext: OPTEMBED_REQUIRE_CUDA is set but the compiled extension did not load "
                               f"({_ext.build_info().get('import_error')}); refusing to run {op} on the reference")
        _ext.warn_fallback_once()
        return True
    if has_kernel(op, device):
        return False
    if device.type == "cuda" and _ext.cuda_required():
        raise RuntimeError(f"optembed_ext: OPTEMBED_REQUIRE_CUDA is set but optembed::{op} has no CUDA kernel in "
                           f"this build (with_cuda={_ext.build_info().get('with_cuda')}); rebuild with "
                           "-Ccmake.define.OPTEMBED_WITH_CUDA=ON")
    return True


# ============================================================================================ argument checks
def _check_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_float(x: Tensor, name: str) -> None:
    _check_tensor(x, name)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def _check_index(x: Tensor, name: str) -> None:
    _check_tensor(x, name)
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")


def _check_device(x: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}")


def _check_bool(x, name: str) -> None:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")


def _check_p(p) -> None:
    if isinstance(p, bool) or not isinstance(p, int):
        raise TypeError(f"p must be an int (1 or 2), got {type(p).__name__}")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")


def _as_dims(dims, weight: Tensor, B: int, nf: int) -> Optional[Tensor]:
    if dims is None:
        return None
    if isinstance(dims, Sequence) and not isinstance(dims, (str, bytes)):
        dims = torch.as_tensor(list(dims), dtype=torch.long, device=weight.device)
    _check_tensor(dims, "dims")
    if dims.dtype not in _INDEX_DTYPES:
        raise TypeError(f"dims must be int32 or int64, got {dims.dtype}")
    if not (tuple(dims.shape) == (nf,) or tuple(dims.shape) == (B, nf)):
        raise ValueError(f"dims must have shape (F,) = ({nf},) or (B, F) = ({B}, {nf}), got {tuple(dims.shape)}")
    _check_device(dims, weight, "dims", "weight")
    return dims


# ============================================================================================ masked_embedding
def masked_embedding(weight: Tensor, indices: Tensor, threshold: Optional[Tensor] = None, dims=None, p: int = 1,
                     oov_weight: Optional[Tensor] = None, *, check_indices: bool = True, deterministic: bool = False,
                     sparse: bool = False, update: Optional["RowUpdate"] = None) -> Tensor:
    """Fused OptEmbed embedding lookup.

    Args:
        weight: ``(N, D)`` table (float32/float64/float16/bfloat16).
        indices: ``(B, F)`` int32/int64 global row ids, ``0 <= id < N``.
        threshold: ``(F,)`` learned per-field norm threshold, or None (every row kept, no STE terms).
        dims: kept-dimension prefix per field ``(F,)`` or per sample ``(B, F)`` (int, values in ``[0, D]``),
            a sequence of F ints, or None (all ``D`` dims).
        p: norm order, 1 or 2.
        oov_weight: ``(F, D)`` vector served (blended through the STE) for pruned rows, or None (zeros).
        check_indices: validate ``0 <= indices < N`` inside the kernel (raises ``IndexError`` naming ``indices``),
            ``dims`` in ``[0, D]`` and ``threshold`` not NaN (``ValueError``). With False nothing is checked: an
            out-of-range id gives a zero row, ``dims`` are clamped to ``[0, D]``, a NaN threshold propagates NaN.
        deterministic: fixed accumulation order in the backward pass (CUDA; the CPU kernel always is). Also
            selected by ``torch.use_deterministic_algorithms(True)``.
        sparse: the gradient of ``weight`` is a sparse COO tensor like ``nn.Embedding(sparse=True)``.
        update: a :class:`RowUpdate`: the backward applies that optimizer step to the touched rows of ``weight``
            in place (and returns no gradient for ``weight``), see :func:`fuse_update`. Without it, a table
            registered with :func:`fuse_update` uses its registered update.

    Returns:
        ``(B, F, D)`` tensor of ``weight.dtype``:
        ``out[b, f, j] = m * w[r, j] + (1 - m) * oov[f, j]`` for ``j < k`` and 0 beyond, with
        ``r = indices[b, f]``, ``m = (||w[r]||_p - threshold[f] > 0)``, ``k = dims[b, f]``.
        The derivative of the step is the long-tail straight-through estimator ``H`` (see ``csrc/common.h``).

    Non-finite values (IEEE arithmetic on the formula, with ``step(NaN) = H(NaN) = NaN``):
        - a NaN in a table row (threshold given) makes its norm NaN: ``out[b, f, :k]`` is NaN for every lookup of
          that row, and so are the whole row's gradient, ``grad_threshold[f]`` and ``grad_oov[f, :k]`` (the row is
          never silently treated as pruned). Without a threshold the row is copied as is (NaN where it is NaN).
        - ``threshold[f] = +inf`` prunes every lookup of field ``f`` (OOV vector or zeros), ``-inf`` keeps every
          one; ``H(+-inf) = 0``, so neither produces an STE term (no NaN from ``0 * inf``).
        - a NaN threshold raises ``ValueError`` when checking; with ``check_indices=False`` it propagates NaN to
          its field (``out[:, f, :k]`` and the gradients of the rows looked up in field ``f``).
        - ``+-inf`` in a kept row is copied (norm ``inf``, ``x = inf``: kept, ``H = 0``); ``inf - inf`` is NaN.
        Positions ``j >= k`` are always exact zeros with no gradient.
    """
    _check_float(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (N, D) tensor, got shape {tuple(weight.shape)}")
    _check_index(indices, "indices")
    if indices.dim() != 2:
        raise ValueError(f"indices must be a 2-D (B, F) tensor, got shape {tuple(indices.shape)}")
    _check_device(indices, weight, "indices", "weight")
    B, nf = indices.shape
    N, D = weight.shape
    _check_p(p)
    if threshold is not None:
        _check_tensor(threshold, "threshold")
        if not threshold.dtype.is_floating_point:
            raise TypeError(f"threshold must be floating point, got {threshold.dtype}")
        if tuple(threshold.shape) != (nf,):
            raise ValueError(f"threshold must have shape (F,) = ({nf},) matching indices.size(1), "
                             f"got {tuple(threshold.shape)}")
        _check_device(threshold, weight, "threshold", "weight")
    dims = _as_dims(dims, weight, B, nf)
    if oov_weight is not None:
        _check_tensor(oov_weight, "oov_weight")
        if tuple(oov_weight.shape) != (nf, D):
            raise ValueError(f"oov_weight must have shape (F, D) = ({nf}, {D}), got {tuple(oov_weight.shape)}")
        if oov_weight.dtype != weight.dtype:
            raise TypeError(f"oov_weight dtype {oov_weight.dtype} must match weight dtype {weight.dtype}")
        _check_device(oov_weight, weight, "oov_weight", "weight")
    _check_bool(check_indices, "check_indices")
    _check_bool(deterministic, "deterministic")
    _check_bool(sparse, "sparse")

    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    if (update is None and _FUSED_COUNT[0] and weight.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):  # a compiled graph takes update= explicitly
        update = _FUSED_UPDATES.get(weight)
    if update is not None:
        if not isinstance(update, RowUpdate):
            raise TypeError(f"update must be an optembed_ext.ops.RowUpdate, got {type(update).__name__}")
        if weight.requires_grad and torch.is_grad_enabled():
            return _MaskedEmbeddingUpdate.apply(weight, threshold, oov_weight, indices, dims, p, check_indices,
                                                update)
    if _reference_path("masked_embedding_forward", weight.device):
        return _ref.masked_embedding(weight, indices, threshold, dims, p, oov_weight, check_indices=check_indices,
                                     deterministic=deterministic, sparse=sparse)
    if not weight.is_contiguous():  # one copy per call (autograd carries the gradient back), not one per pass
        weight = weight.contiguous()
    out, _ = torch.ops.optembed.masked_embedding(weight, indices, threshold, dims, p, oov_weight, check_indices,
                                                 deterministic, sparse)
    return out


def _masked_embedding_fake(weight, indices, threshold, dims, p, oov_weight, check_indices):
    B, nf = indices.shape
    out = weight.new_empty((B, nf, weight.shape[1]))
    norm = weight.new_empty((B, nf), dtype=_ref.acc_dtype(weight.dtype))
    return out, norm


def _masked_embedding_backward_fake(grad_out, weight, indices, norm, threshold, dims, p, oov_weight, deterministic,
                                    sparse):
    B, nf = indices.shape
    N, D = weight.shape
    grad_weight = weight.new_empty((B * nf, D) if sparse else (N, D))
    grad_t = threshold.new_empty((nf,)) if threshold is not None else weight.new_empty((0,))
    grad_oov = weight.new_empty((nf, D)) if oov_weight is not None else weight.new_empty((0,))
    return grad_weight, grad_t, grad_oov


def _masked_embedding_grads(ctx, grad_out, sparse: bool, deterministic: bool):
    weight, indices, norm, threshold, dims, oov_weight = ctx.saved_tensors
    if grad_out is None:
        return None, None, None
    gw, gt, goov = torch.ops.optembed.masked_embedding_backward(grad_out.contiguous(), weight, indices, norm,
                                                                threshold, dims, ctx.p, oov_weight, deterministic,
                                                                sparse)
    if sparse:
        # Rows of out-of-range ids (only possible unchecked) are zero; clamp their ids so that the COO gradient
        # never points outside the table.
        ids = indices.reshape(1, -1).long()
        ids = ids.clamp(0, weight.shape[0] - 1) if weight.shape[0] > 0 else ids[:, :0]
        gw = torch.sparse_coo_tensor(ids, gw[: ids.shape[1]], weight.shape, check_invariants=False)
    return gw, (gt if threshold is not None else None), (goov if oov_weight is not None else None)


def _masked_embedding_setup(ctx, inputs, output):
    weight, indices, threshold, dims, p, oov_weight = inputs[:6]
    ctx.p = p
    ctx.save_for_backward(weight, indices, output[1], threshold, dims, oov_weight)
    ctx.mark_non_differentiable(output[1])  # the norms are a by-product saved for the backward pass
    if len(inputs) > 7:  # the Python op carries (deterministic, sparse)
        ctx.deterministic, ctx.sparse = inputs[7], inputs[8]
    else:
        ctx.deterministic, ctx.sparse = False, False
    ctx.set_materialize_grads(False)


def _masked_embedding_forward_backward(ctx, grad_out, grad_norm):
    gw, gt, goov = _masked_embedding_grads(ctx, grad_out, False, False)
    return gw, None, gt, None, None, goov, None


def _masked_embedding_op_backward(ctx, grad_out, grad_norm):
    gw, gt, goov = _masked_embedding_grads(ctx, grad_out, ctx.sparse, ctx.deterministic)
    return gw, None, gt, None, None, goov, None, None, None


# ============================================================== masked_embedding with the optimizer in its backward
class RowUpdate:
    """An optimizer step applied inside the masked lookup's backward (FBGEMM's fused table-batched backward).

    The backward of :func:`masked_embedding` then updates the touched rows of ``weight`` in place with
    :func:`sparse_row_update`'s rules -- summed per row (ascending lookup order, deterministic), ``weight_decay``
    added, SGD / row-wise Adagrad / lazy Adam applied once per row -- without ever forming the table's gradient
    (neither ``(N, D)`` nor the ``(B * F, D)`` per-lookup rows). ``weight.grad`` stays untouched; the threshold
    and OOV gradients are returned as usual. ``step`` counts the backward passes (Adam's ``t``).

    Args:
        weight: the ``(N, D)`` contiguous table (its state is allocated here, in the accumulation dtype).
        optimizer: ``"sgd"``, ``"adagrad"`` (row-wise) or ``"adam"`` (lazy).
        lr, eps, betas, weight_decay: as :func:`sparse_row_update`. ``initial_accumulator_value``: Adagrad's
            starting sum.
        lazy_weight_decay: keep ``last_step`` (``(N,)`` int64, the step of each row's last update) and catch a
            touched row up on the decay steps it skipped before updating it (see :func:`sparse_row_update`);
            :meth:`catch_up` brings every row up to date (e.g. before evaluating or exporting the table).

    Attributes ``lr``, ``eps``, ``beta1``, ``beta2``, ``weight_decay`` may be changed between steps (schedulers);
    ``state1`` / ``state2`` are the optimizer state (Adagrad: ``(N,)`` sum; Adam: ``(N, D)`` moments).

    A table used by two lookups in one graph cannot be updated by the first backward (the second still needs the
    old rows): autograd then raises that a saved tensor was modified in place.
    """

    def __init__(self, weight: Tensor, optimizer: str = "sgd", lr: float = 1e-2, eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, lazy_weight_decay: bool = False):
        _check_float(weight, "weight")
        _check_bool(lazy_weight_decay, "lazy_weight_decay")
        if weight.dim() != 2 or not weight.is_contiguous():
            raise ValueError(f"weight must be a contiguous 2-D (N, D) table, got shape {tuple(weight.shape)}")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be 'sgd', 'adagrad' or 'adam', got {optimizer!r}")
        self.optimizer = optimizer
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.step = 0
        acc = _ref.acc_dtype(weight.dtype)
        N, D = weight.shape
        self.state1: Optional[Tensor] = None
        self.state2: Optional[Tensor] = None
        if optimizer == "adagrad":
            self.state1 = torch.full((N,), float(initial_accumulator_value), dtype=acc, device=weight.device)
        elif optimizer == "adam":
            self.state1 = torch.zeros((N, D), dtype=acc, device=weight.device)
            self.state2 = torch.zeros((N, D), dtype=acc, device=weight.device)
        self.last_step: Optional[Tensor] = (torch.zeros((N,), dtype=torch.long, device=weight.device)
                                            if lazy_weight_decay else None)
        self.weight = weight

    def catch_up(self) -> None:
        """Lazy weight decay: apply the decay steps every row skipped up to the current ``step`` (no-op without
        ``lazy_weight_decay``)."""
        if self.last_step is not None:
            lazy_decay_catch_up(self.weight, self.last_step, self.state1, self.state2, optimizer=self.optimizer,
                                lr=self.lr, eps=self.eps, beta1=self.beta1, beta2=self.beta2,
                                weight_decay=self.weight_decay, step=self.step)

    def __repr__(self) -> str:
        return f"RowUpdate(optimizer={self.optimizer!r}, lr={self.lr}, step={self.step})"


# tables whose masked lookups apply their RowUpdate in the backward (fuse_update); the count keeps the common
# path (no table registered) a plain int test, traceable by torch.compile
_FUSED_UPDATES = torch.utils.weak.WeakIdKeyDictionary()
_FUSED_COUNT = [0]


def fuse_update(weight: Tensor, update: Optional[RowUpdate]) -> None:
    """Every :func:`masked_embedding` lookup into ``weight`` (with autograd recording) applies ``update`` in its
    backward from now on; ``update=None`` switches it off again. :class:`optembed_ext.optim.FusedBackwardOptimizer`
    calls this for its tables, so modules that call :func:`masked_embedding` need no change."""
    _check_tensor(weight, "weight")
    if update is None:
        _FUSED_UPDATES.pop(weight, None)
    else:
        if not isinstance(update, RowUpdate):
            raise TypeError(f"update must be an optembed_ext.ops.RowUpdate, got {type(update).__name__}")
        if weight not in _FUSED_UPDATES:
            weakref.finalize(weight, _recount_fused)  # a table that dies unregistered leaves no stale count
        _FUSED_UPDATES[weight] = update
    _recount_fused()


def _recount_fused() -> None:
    _FUSED_COUNT[0] = sum(1 for _ in _FUSED_UPDATES.keys())  # live tables only


def fused_update_of(weight: Tensor) -> Optional[RowUpdate]:
    """The :class:`RowUpdate` registered for ``weight`` by :func:`fuse_update`, or None."""
    return _FUSED_UPDATES.get(weight)


class _MaskedEmbeddingUpdate(torch.autograd.Function):
    """masked_embedding whose backward applies a RowUpdate to the table instead of returning its gradient."""

    @staticmethod
    def forward(ctx, weight, threshold, oov_weight, indices, dims, p, check_indices, update):
        if _reference_path("masked_embedding_forward", weight.device):
            # (autograd is off inside forward; the reference backward recomputes the lookup)
            out = _ref.masked_embedding(weight, indices, threshold, dims, p, oov_weight, check_indices=check_indices)
            norm = None
            ctx.reference = True
        else:
            out, norm = torch.ops.optembed.masked_embedding_forward(weight, indices, threshold, dims, p, oov_weight,
                                                                    check_indices)
            ctx.reference = False
        ctx.p, ctx.update = p, update
        ctx.save_for_backward(weight, indices, norm, threshold, dims, oov_weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, indices, norm, threshold, dims, oov_weight = ctx.saved_tensors
        u = ctx.update
        u.step += 1
        hyper = dict(optimizer=u.optimizer, lr=u.lr, eps=u.eps, beta1=u.beta1, beta2=u.beta2,
                     weight_decay=u.weight_decay, step=u.step, last_step=u.last_step)
        with torch.no_grad():
            if ctx.reference:
                gt, goov = _ref.masked_embedding_backward_update(grad_out, weight, indices, threshold, dims, ctx.p,
                                                                 oov_weight, u.state1, u.state2, **hyper)
            elif _reference_path("masked_embedding_backward_update", weight.device):
                # no fused kernel for this device: the per-lookup rows of the compiled backward, then the fused
                # optimizer (same result, one extra pass over the rows)
                rows, gt, goov = torch.ops.optembed.masked_embedding_backward(
                    grad_out.contiguous(), weight, indices, norm, threshold, dims, ctx.p, oov_weight, True, True)
                sparse_row_update(weight, indices.reshape(-1), rows, u.state1, u.state2, **hyper)
            else:
                gt, goov = torch.ops.optembed.masked_embedding_backward_update(
                    grad_out.contiguous(), weight, indices, norm, threshold, dims, ctx.p, oov_weight, u.state1,
                    u.state2, hyper["optimizer"], hyper["lr"], hyper["eps"], hyper["beta1"], hyper["beta2"],
                    hyper["weight_decay"], hyper["step"], u.last_step)
        return (None, gt if threshold is not None else None, goov if oov_weight is not None else None,
                None, None, None, None, None)


# =================================================================================================== row_mask
def row_mask(weight: Tensor, field_of_row: Tensor, threshold: Tensor, p: int = 1) -> Tensor:
    """Rows of the table that survive the learned thresholds.

    Args:
        weight: ``(N, D)`` table. field_of_row: ``(N,)`` int32/int64 field of each row, in ``[0, F)``.
        threshold: ``(F,)`` per-field threshold (no NaN). p: norm order, 1 or 2.

    Returns:
        bool ``(N,)``: ``||weight[r]||_p - threshold[field_of_row[r]] > 0``. Not differentiable.
    """
    _check_float(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (N, D) tensor, got shape {tuple(weight.shape)}")
    _check_index(field_of_row, "field_of_row")
    if tuple(field_of_row.shape) != (weight.shape[0],):
        raise ValueError(f"field_of_row must have shape (N,) = ({weight.shape[0]},) matching weight.size(0), "
                         f"got {tuple(field_of_row.shape)}")
    _check_device(field_of_row, weight, "field_of_row", "weight")
    _check_tensor(threshold, "threshold")
    if not threshold.dtype.is_floating_point:
        raise TypeError(f"threshold must be floating point, got {threshold.dtype}")
    if threshold.dim() != 1:
        raise ValueError(f"threshold must be a 1-D (F,) tensor, got shape {tuple(threshold.shape)}")
    _check_device(threshold, weight, "threshold", "weight")
    _check_p(p)
    if _reference_path("row_mask", weight.device):
        return _ref.row_mask(weight, field_of_row, threshold, p)
    return torch.ops.optembed.row_mask(weight.detach(), field_of_row, threshold.detach(), p)


def _row_mask_fake(weight, field_of_row, threshold, p):
    return weight.new_empty((weight.shape[0],), dtype=torch.bool)


# =========================================================================================== compact_embedding
def compact_embedding(packed: Tensor, field_offsets: Tensor, field_dims: Tensor, remap: Tensor, indices: Tensor,
                      out_dim: int, oov: Optional[Tensor] = None, *, check_indices: bool = True,
                      deterministic: bool = False, sparse: bool = False) -> Tensor:
    """Mixed-dimension lookup over per-field compact tables packed in one buffer.

    Args:
        packed: ``(P,)`` all field tables flattened; field ``f`` is ``packed[field_offsets[f]:field_offsets[f+1]]``
            viewed as ``(R_f, D_f)``.
        field_offsets: ``(F+1,)`` int64, non-decreasing. field_dims: ``(F,)`` int64 in ``[0, out_dim]``.
        remap: ``(N,)`` int32/int64 global id -> local row of its field, ``-1`` for pruned ids.
        indices: ``(B, F)`` int32/int64 global ids. out_dim: width of the zero-padded output.
        oov: ``(F, out_dim)`` vector served for pruned ids (its first ``D_f`` entries), or None (zeros).
        check_indices: validate ids and remapped rows inside the kernel (``IndexError`` naming ``indices`` or
            ``remap``, first bad lookup) and the layout (``field_offsets``, ``field_dims``, ``ValueError``); on CUDA
            with one host synchronisation. With False an invalid lookup yields zeros and no gradient, and the CUDA
            kernel does not read the layout back to the host (no synchronisation): a field whose block does not fit
            ``packed`` serves zeros (:class:`~optembed_ext.nn.CompactEmbedding` validates its layout once). The CPU
            kernel and the reference always validate the layout.
        deterministic: fixed accumulation order in the backward pass (the CPU kernel always is).
        sparse: the gradient of ``packed`` is a 1-D sparse COO tensor of the looked-up entries.

    Returns:
        ``(B, F, out_dim)`` tensor of ``packed.dtype``.
    """
    _check_float(packed, "packed")
    if packed.dim() != 1:
        raise ValueError(f"packed must be 1-D (all field tables flattened), got shape {tuple(packed.shape)}")
    _check_index(indices, "indices")
    if indices.dim() != 2:
        raise ValueError(f"indices must be a 2-D (B, F) tensor, got shape {tuple(indices.shape)}")
    nf = indices.shape[1]
    _check_tensor(field_offsets, "field_offsets")
    if field_offsets.dtype != torch.int64 or tuple(field_offsets.shape) != (nf + 1,):
        raise ValueError(f"field_offsets must be an int64 tensor of shape (F+1,) = ({nf + 1},), "
                         f"got {field_offsets.dtype} {tuple(field_offsets.shape)}")
    _check_tensor(field_dims, "field_dims")
    if field_dims.dtype != torch.int64 or tuple(field_dims.shape) != (nf,):
        raise ValueError(f"field_dims must be an int64 tensor of shape (F,) = ({nf},), "
                         f"got {field_dims.dtype} {tuple(field_dims.shape)}")
    _check_index(remap, "remap")
    if remap.dim() != 1:
        raise ValueError(f"remap must be a 1-D (N,) tensor, got shape {tuple(remap.shape)}")
    if isinstance(out_dim, bool) or not isinstance(out_dim, int):
        raise TypeError(f"out_dim must be an int, got {type(out_dim).__name__}")
    if out_dim < 0:
        raise ValueError(f"out_dim must be >= 0, got {out_dim}")
    for t, name in ((field_offsets, "field_offsets"), (field_dims, "field_dims"), (remap, "remap"),
                    (indices, "indices")):
        _check_device(t, packed, name, "packed")
    if oov is not None:
        _check_tensor(oov, "oov")
        if tuple(oov.shape) != (nf, out_dim):
            raise ValueError(f"oov must have shape (F, out_dim) = ({nf}, {out_dim}), got {tuple(oov.shape)}")
        if oov.dtype != packed.dtype:
            raise TypeError(f"oov dtype {oov.dtype} must match packed dtype {packed.dtype}")
        _check_device(oov, packed, "oov", "packed")
    _check_bool(check_indices, "check_indices")
    _check_bool(deterministic, "deterministic")
    _check_bool(sparse, "sparse")
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    if _reference_path("compact_embedding_forward", packed.device):
        return _ref.compact_embedding(packed, field_offsets, field_dims, remap, indices, out_dim, oov,
                                      check_indices=check_indices, deterministic=deterministic, sparse=sparse)
    return torch.ops.optembed.compact_embedding(packed, field_offsets, field_dims, remap, indices, out_dim, oov,
                                                check_indices, deterministic, sparse)


def _compact_embedding_fake(packed, field_offsets, field_dims, remap, indices, out_dim, oov, check_indices):
    return packed.new_empty((indices.shape[0], indices.shape[1], out_dim))


def _compact_embedding_backward_fake(grad_out, packed, field_offsets, field_dims, remap, indices, oov,
                                     deterministic):
    return packed.new_empty(packed.shape), (oov.new_empty(oov.shape) if oov is not None else packed.new_empty((0,)))


def _compact_sparse_grads(grad_out, packed, field_offsets, field_dims, remap, indices, oov):
    """Sparse COO gradient of ``packed`` (one entry per looked-up kept element) and the dense ``oov`` gradient."""
    out_dim = grad_out.shape[2]
    d = field_dims.long()
    rows = torch.where(d > 0, (field_offsets[1:] - field_offsets[:-1]) // d.clamp(min=1), torch.full_like(d, -1))
    r = _ref._compact_rows(remap, indices, rows.unsqueeze(0))  # (B, F); -2 (invalid lookup): no gradient
    cols = torch.arange(out_dim, device=packed.device)
    in_dim = cols.view(1, 1, -1) < d.view(1, -1, 1)
    kept = (r >= 0).unsqueeze(-1)
    sel = (in_dim & kept).expand_as(grad_out)
    pos = field_offsets[:-1].view(1, -1, 1) + r.clamp(min=0).unsqueeze(-1) * d.view(1, -1, 1) + cols.view(1, 1, -1)
    pos = pos.expand_as(grad_out)
    grad_packed = torch.sparse_coo_tensor(pos[sel].unsqueeze(0), grad_out[sel], packed.shape,
                                          check_invariants=False)
    grad_oov = None
    if oov is not None:
        grad_oov = (grad_out * (in_dim & (r == -1).unsqueeze(-1)).to(grad_out.dtype)).sum(0)
    return grad_packed, grad_oov


def _compact_setup(ctx, inputs, output):
    packed, field_offsets, field_dims, remap, indices, out_dim, oov = inputs[:7]
    ctx.save_for_backward(packed, field_offsets, field_dims, remap, indices, oov)
    if len(inputs) > 8:
        ctx.deterministic, ctx.sparse = inputs[8], inputs[9]
    else:
        ctx.deterministic, ctx.sparse = False, False
    ctx.set_materialize_grads(False)


def _compact_grads(ctx, grad_out):
    packed, field_offsets, field_dims, remap, indices, oov = ctx.saved_tensors
    if grad_out is None:
        return None, None
    if ctx.sparse:
        return _compact_sparse_grads(grad_out, packed, field_offsets, field_dims, remap, indices, oov)
    gp, goov = torch.ops.optembed.compact_embedding_backward(grad_out.contiguous(), packed, field_offsets,
                                                            field_dims, remap, indices, oov, ctx.deterministic)
    return gp, (goov if oov is not None else None)


def _compact_forward_backward(ctx, grad_out):
    gp, goov = _compact_grads(ctx, grad_out)
    return gp, None, None, None, None, None, goov, None


def _compact_op_backward(ctx, grad_out):
    gp, goov = _compact_grads(ctx, grad_out)
    return gp, None, None, None, None, None, goov, None, None, None


# =========================================================================================== sparse_row_update
_OPTIMIZERS = ("sgd", "adagrad", "adam")


def sparse_row_update(weight: Tensor, indices: Tensor, grad_rows: Tensor, state1: Optional[Tensor] = None,
                      state2: Optional[Tensor] = None, *, optimizer: str = "sgd", lr: float, eps: float = 1e-8,
                      beta1: float = 0.9, beta2: float = 0.999, weight_decay: float = 0.0, step: int = 1,
                      check_indices: bool = True, last_step: Optional[Tensor] = None) -> None:
    """Fused sparse optimizer step on the rows of ``weight`` listed in ``indices`` (in place, no autograd).

    Args:
        weight: ``(N, D)`` contiguous table, updated in place.
        indices: ``(M,)`` int32/int64 rows (any shape is flattened), may repeat.
        grad_rows: ``(M, D)`` gradient contribution of each position (same dtype/device as ``weight``).
        state1, state2: optimizer state in the accumulation dtype (float64 for float64 weights, else float32):
            sgd: none; adagrad: ``state1`` ``(N,)``; adam: ``state1``, ``state2`` ``(N, D)``.
        optimizer: ``"sgd"``, ``"adagrad"`` (row-wise) or ``"adam"`` (lazy). step: Adam step ``t >= 1``.
        check_indices: raise ``IndexError`` naming the first entry of ``indices`` outside ``[0, N)`` before anything
            is written. With False such entries are skipped (no write outside the table).
        last_step: lazy weight decay (``None``: off): ``(N,)`` int64, the step of each row's last update, updated
            in place. A touched row with ``last_step[r] < step - 1`` is first caught up on the steps it skipped --
            those in which a dense optimizer would have applied the decay gradient ``weight_decay * w`` alone
            (:func:`optembed_ext.reference.lazy_decay_catch_up`: exact for SGD, an approximation for Adagrad and
            Adam) -- then updated, and ``last_step[r] = step``. Start it at zeros (step 0 = the initial table).

    Rows are summed per distinct id (ascending position), ``weight_decay * w`` is added, and the optimizer update is
    applied once per touched row; untouched rows and their state are neither read nor written (with ``last_step``
    their decay is deferred to their next update, or to :func:`lazy_decay_catch_up`).
    """
    _check_float(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (N, D) tensor, got shape {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (it is updated in place)")
    N, D = weight.shape
    _check_index(indices, "indices")
    _check_device(indices, weight, "indices", "weight")
    indices = indices.reshape(-1)
    M = indices.shape[0]
    _check_tensor(grad_rows, "grad_rows")
    if grad_rows.layout != torch.strided:
        raise TypeError("grad_rows must be a dense (strided) tensor; pass a sparse gradient's indices and values")
    if tuple(grad_rows.shape) != (M, D):
        raise ValueError(f"grad_rows must have shape (M, D) = ({M}, {D}), got {tuple(grad_rows.shape)}")
    if grad_rows.dtype != weight.dtype:
        raise TypeError(f"grad_rows dtype {grad_rows.dtype} must match weight dtype {weight.dtype}")
    _check_device(grad_rows, weight, "grad_rows", "weight")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be 'sgd', 'adagrad' or 'adam', got {optimizer!r}")
    acc = _ref.acc_dtype(weight.dtype)
    shapes = {"sgd": (None, None), "adagrad": ((N,), None), "adam": ((N, D), (N, D))}[optimizer]
    for st, shape, name in ((state1, shapes[0], "state1"), (state2, shapes[1], "state2")):
        if shape is None:
            if st is not None:
                raise ValueError(f"{name} must be None for optimizer {optimizer!r}")
            continue
        if st is None:
            raise ValueError(f"{name} of shape {shape} is required for optimizer {optimizer!r}")
        _check_tensor(st, name)
        if tuple(st.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for optimizer {optimizer!r}, got {tuple(st.shape)}")
        if st.dtype != acc:
            raise TypeError(f"{name} must have dtype {acc} for {weight.dtype} weights, got {st.dtype}")
        if not st.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
        _check_device(st, weight, name, "weight")
    for value, name in ((lr, "lr"), (eps, "eps"), (beta1, "beta1"), (beta2, "beta2"), (weight_decay, "weight_decay")):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    for value, name in ((lr, "lr"), (weight_decay, "weight_decay")):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if optimizer != "sgd" and not eps > 0:
        raise ValueError(f"eps must be > 0 for optimizer {optimizer!r}, got {eps}")
    if optimizer == "adam":
        for value, name in ((beta1, "beta1"), (beta2, "beta2")):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    _check_bool(check_indices, "check_indices")
    _check_last_step(last_step, weight)
    if _reference_path("sparse_row_update", weight.device):
        _ref.sparse_row_update(weight, indices, grad_rows, state1, state2, optimizer=optimizer, lr=float(lr),
                               eps=float(eps), beta1=float(beta1), beta2=float(beta2),
                               weight_decay=float(weight_decay), step=step, check_indices=check_indices,
                               last_step=last_step)
        return
    with torch.no_grad():
        torch.ops.optembed.sparse_row_update(weight, indices, grad_rows, state1, state2, optimizer, float(lr),
                                             float(eps), float(beta1), float(beta2), float(weight_decay), step,
                                             check_indices, last_step)


def _check_last_step(last_step: Optional[Tensor], weight: Tensor) -> None:
    if last_step is None:
        return
    _check_tensor(last_step, "last_step")
    if last_step.dtype != torch.long:
        raise TypeError(f"last_step must be int64, got {last_step.dtype}")
    if tuple(last_step.shape) != (weight.shape[0],):
        raise ValueError(f"last_step must have shape (N,) = ({weight.shape[0]},), got {tuple(last_step.shape)}")
    if not last_step.is_contiguous():
        raise ValueError("last_step must be contiguous (it is updated in place)")
    _check_device(last_step, weight, "last_step", "weight")


def lazy_decay_catch_up(weight: Tensor, last_step: Tensor, state1: Optional[Tensor] = None,
                        state2: Optional[Tensor] = None, *, optimizer: str, lr: float, eps: float = 1e-8,
                        beta1: float = 0.9, beta2: float = 0.999, weight_decay: float, step: int,
                        rows: Optional[Tensor] = None) -> None:
    """Lazy weight decay: bring ``rows`` (default: every row) of a table updated by :func:`sparse_row_update`
    with ``last_step`` up to date at ``step``, applying the decay steps each skipped since its last update (in
    place; ``last_step[r] = step`` afterwards). The rules are those of
    :func:`optembed_ext.reference.lazy_decay_catch_up`. Costs ``O(rows * D)``: call it before evaluating,
    pruning or exporting the table, not every step."""
    _check_float(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (N, D) tensor, got shape {tuple(weight.shape)}")
    if last_step is None:
        raise ValueError("last_step is required")
    _check_last_step(last_step, weight)
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be 'sgd', 'adagrad' or 'adam', got {optimizer!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if rows is None:
        rows = torch.arange(weight.shape[0], device=weight.device)
    else:
        _check_index(rows, "rows")
        rows = torch.unique(rows.long().reshape(-1))
        if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= weight.shape[0]):
            raise IndexError(f"rows must lie in [0, {weight.shape[0]})")
    with torch.no_grad():
        _ref.lazy_decay_catch_up(weight, rows, last_step, state1, state2, optimizer=optimizer, lr=float(lr),
                                 eps=float(eps), beta1=float(beta1), beta2=float(beta2),
                                 weight_decay=float(weight_decay), upto=step)


def _masked_embedding_backward_update_fake(grad_out, weight, indices, norm, threshold, dims, p, oov_weight, state1,
                                           state2, optimizer, lr, eps, beta1, beta2, weight_decay, step,
                                           last_step=None):
    grad_t = threshold.new_empty((indices.shape[1],)) if threshold is not None else weight.new_empty((0,))
    grad_oov = weight.new_empty(oov_weight.shape) if oov_weight is not None else weight.new_empty((0,))
    return grad_t, grad_oov


def _sparse_row_update_fake(weight, indices, grad_rows, state1, state2, optimizer, lr, eps, beta1, beta2,
                            weight_decay, step, check_indices=True, last_step=None):
    return None


# ============================================================================================== registration
def _register() -> None:
    lib = torch.library

    # Python-level ops: carry the backward-only flags (deterministic, sparse) to the backward pass.
    @lib.custom_op("optembed::masked_embedding", mutates_args=())
    def _masked_embedding_op(weight: Tensor, indices: Tensor, threshold: Optional[Tensor], dims: Optional[Tensor],
                             p: int, oov_weight: Optional[Tensor], check_indices: bool, deterministic: bool,
                             sparse: bool) -> tuple[Tensor, Tensor]:
        return torch.ops.optembed.masked_embedding_forward(weight, indices, threshold, dims, p, oov_weight,
                                                           check_indices)

    @_masked_embedding_op.register_fake
    def _(weight, indices, threshold, dims, p, oov_weight, check_indices, deterministic, sparse):
        return _masked_embedding_fake(weight, indices, threshold, dims, p, oov_weight, check_indices)

    _masked_embedding_op.register_autograd(_masked_embedding_op_backward, setup_context=_masked_embedding_setup)

    @lib.custom_op("optembed::compact_embedding", mutates_args=())
    def _compact_embedding_op(packed: Tensor, field_offsets: Tensor, field_dims: Tensor, remap: Tensor,
                              indices: Tensor, out_dim: int, oov: Optional[Tensor], check_indices: bool,
                              deterministic: bool, sparse: bool) -> Tensor:
        return torch.ops.optembed.compact_embedding_forward(packed, field_offsets, field_dims, remap, indices,
                                                            out_dim, oov, check_indices)

    @_compact_embedding_op.register_fake
    def _(packed, field_offsets, field_dims, remap, indices, out_dim, oov, check_indices, deterministic, sparse):
        return _compact_embedding_fake(packed, field_offsets, field_dims, remap, indices, out_dim, oov,
                                       check_indices)

    _compact_embedding_op.register_autograd(_compact_op_backward, setup_context=_compact_setup)

    # The compiled ops themselves: fake kernels, and autograd (dense, default order) for direct callers.
    lib.register_fake("optembed::masked_embedding_forward", _masked_embedding_fake)
    lib.register_fake("optembed::masked_embedding_backward", _masked_embedding_backward_fake)
    lib.register_autograd("optembed::masked_embedding_forward", _masked_embedding_forward_backward,
                          setup_context=_masked_embedding_setup)
    lib.register_fake("optembed::row_mask", _row_mask_fake)
    lib.register_fake("optembed::compact_embedding_forward", _compact_embedding_fake)
    lib.register_fake("optembed::compact_embedding_backward", _compact_embedding_backward_fake)
    lib.register_autograd("optembed::compact_embedding_forward", _compact_forward_backward,
                          setup_context=_compact_setup)
    lib.register_fake("optembed::sparse_row_update", _sparse_row_update_fake)
    lib.register_fake("optembed::masked_embedding_backward_update", _masked_embedding_backward_update_fake)


if _ext.HAS_EXTENSION:
    _scan_kernels()
    _register()
