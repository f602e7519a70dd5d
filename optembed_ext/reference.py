"""Pure-PyTorch reference implementations of the fused ops in :mod:`optembed_ext.ops`.

Every function has the same name and signature as its counterpart in :mod:`optembed_ext.ops` and is written as a
plain autograd expression of the op's formula (see the header comment of ``csrc/<op>.cpp``). They serve three
purposes: the test oracle of the compiled kernels, the fallback when the compiled extension is unavailable
(or when ``optembed_ext.ops.use_reference(True)`` / ``OPTEMBED_USE_REFERENCE=1`` asks for it), and readable
documentation of the semantics.

The references only validate what the kernels validate at run time (index ranges, ``dims`` ranges, NaN
thresholds); shape/dtype checks live in :mod:`optembed_ext.ops`, which validates before dispatching to either
implementation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["masked_embedding", "row_mask", "compact_embedding", "sparse_row_update", "step_ste_grad", "acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the ops: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_index_range(indices: torch.Tensor, n: int, name: str) -> None:
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= n)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise IndexError(f"{name}{list(pos)} = {int(indices[pos])} is out of range for {n} rows "
                         f"(valid ids are 0 <= id < {n})")


def _check_threshold_not_nan(threshold: torch.Tensor, op: str) -> None:
    if threshold.numel() and bool(torch.isnan(threshold).any()):
        f = int(torch.isnan(threshold).nonzero()[0, 0])
        raise ValueError(f"{op}: threshold[{f}] is NaN")


# ============================================================================================ masked_embedding
def step_ste_grad(x: torch.Tensor) -> torch.Tensor:
    """Long-tail straight-through estimator of the unit step's derivative (OptEmbed):
    ``H(x) = 2 - 4|x|`` for ``|x| <= 0.4``, ``0.4`` for ``0.4 < |x| <= 1``, ``0`` otherwise."""
    ax = x.abs()
    return torch.where(ax <= 0.4, 2.0 - 4.0 * ax, torch.where(ax <= 1.0, torch.full_like(x, 0.4),
                                                              torch.zeros_like(x)))


def _step_ste(x: torch.Tensor) -> torch.Tensor:
    """Unit step ``(x > 0)`` in the forward pass whose autograd derivative is ``H(x)`` (detach trick)."""
    hard = (x > 0).to(x.dtype)
    h = step_ste_grad(x.detach())
    return hard + h * (x - x.detach())


def masked_embedding(weight: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor | None = None,
                     dims: torch.Tensor | None = None, p: int = 1, oov_weight: torch.Tensor | None = None, *,
                     check_indices: bool = True, deterministic: bool = False, sparse: bool = False) -> torch.Tensor:
    """Reference of :func:`optembed_ext.ops.masked_embedding` (same arguments, output ``(B, F, D)``).

    ``n = ||weight[r]||_p``, ``m = step(n - threshold[f])`` (1 without threshold) with the long-tail STE as its
    derivative, ``out[b, f, :k] = m * w[r, :k] + (1 - m) * oov[f, :k]`` and zeros beyond ``k = dims[b, f]``.
    """
    del deterministic  # autograd of this expression has a fixed order on the CPU
    N, D = weight.shape
    B, nf = indices.shape
    idx = indices.long()
    if check_indices:
        _check_index_range(idx, N, "indices")
    rows = F.embedding(idx, weight, sparse=sparse)  # (B, F, D); every weight gradient flows through here
    acc = acc_dtype(weight.dtype)
    if threshold is not None:
        _check_threshold_not_nan(threshold, "masked_embedding")
        norm = torch.linalg.vector_norm(rows, ord=p, dim=-1, dtype=acc)  # subgradient 0 at n = 0 (p = 2)
        m = _step_ste(norm - threshold.to(acc))  # (B, F)
    else:
        m = torch.ones(B, nf, dtype=acc, device=weight.device)
    m = m.to(weight.dtype).unsqueeze(-1)
    if oov_weight is not None:
        out = m * rows + (1 - m) * oov_weight.unsqueeze(0)
    else:
        out = m * rows
    if dims is not None:
        k = torch.as_tensor(dims, device=weight.device).long()
        if k.numel() and bool(((k < 0) | (k > D)).any()):
            bad = ((k < 0) | (k > D)).nonzero()[0]
            raise ValueError(f"dims{bad.tolist()} = {int(k[tuple(bad)])} must lie in [0, D = {D}]")
        if k.dim() == 1:
            k = k.unsqueeze(0)
        cols = torch.arange(D, device=weight.device)
        keep = (cols < k.unsqueeze(-1)).to(out.dtype)  # (1 or B, F, D)
        out = out * keep
    return out


# ==================================================================================================== row_mask
def row_mask(weight: torch.Tensor, field_of_row: torch.Tensor, threshold: torch.Tensor, p: int = 1) -> torch.Tensor:
    """Reference of :func:`optembed_ext.ops.row_mask`: ``||weight[r]||_p > threshold[field_of_row[r]]``, bool (N,)."""
    _check_threshold_not_nan(threshold, "row_mask")
    fr = field_of_row.long()
    _check_index_range(fr, threshold.shape[0], "field_of_row")
    acc = acc_dtype(weight.dtype)
    with torch.no_grad():
        norm = torch.linalg.vector_norm(weight, ord=p, dim=1, dtype=acc)
        return (norm - threshold.to(acc)[fr]) > 0


# =========================================================================================== compact_embedding
def compact_embedding(packed: torch.Tensor, field_offsets: torch.Tensor, field_dims: torch.Tensor,
                      remap: torch.Tensor, indices: torch.Tensor, out_dim: int, oov: torch.Tensor | None = None, *,
                      check_indices: bool = True, deterministic: bool = False, sparse: bool = False) -> torch.Tensor:
    """Reference of :func:`optembed_ext.ops.compact_embedding` (output ``(B, F, out_dim)``).

    ``r = remap[indices[b, f]]``; ``out[b, f, j] = packed[field_offsets[f] + r * D_f + j]`` for ``r >= 0`` and
    ``j < D_f``, ``oov[f, j]`` (or 0) for ``r == -1`` and ``j < D_f``, and 0 for ``j >= D_f``.
    """
    B, nf = indices.shape
    dev = packed.device
    idx = indices.long()
    rmp = remap.long()
    d = field_dims.long()
    off = field_offsets.long()
    if check_indices:
        _check_index_range(idx, rmp.numel(), "indices")
    r = rmp[idx] if idx.numel() else torch.zeros(B, nf, dtype=torch.long, device=dev)  # (B, F)
    if check_indices and r.numel():
        rows = torch.where(d > 0, (off[1:] - off[:-1]) // d.clamp(min=1), torch.zeros_like(d))  # R_f
        bad = (r < -1) | ((r >= rows.unsqueeze(0)) & (d.unsqueeze(0) > 0))
        if bool(bad.any()):
            b, f = (int(i) for i in bad.nonzero()[0])
            raise IndexError(f"compact_embedding: remap[{int(idx[b, f])}] = {int(r[b, f])} (looked up by "
                             f"indices[{b}, {f}]) is out of range [-1, {int(rows[f])}) for field {f}")
    cols = torch.arange(out_dim, device=dev)
    in_dim = cols.view(1, 1, -1) < d.view(1, -1, 1)  # (1, F, out_dim): j < D_f
    kept = (r >= 0).unsqueeze(-1)  # (B, F, 1)
    sel = (in_dim & kept).expand(B, nf, out_dim)
    pos = off[:nf].view(1, -1, 1) + r.clamp(min=0).unsqueeze(-1) * d.view(1, -1, 1) + cols.view(1, 1, -1)
    pos = pos.expand(B, nf, out_dim)[sel]  # flat positions in packed of the served elements
    if sparse:
        vals = _SparseGather.apply(packed, pos)
    elif deterministic:
        vals = _OrderedGather.apply(packed, pos)
    else:
        vals = packed[pos]
    out = torch.zeros(B, nf, out_dim, dtype=packed.dtype, device=dev).masked_scatter(sel, vals)
    if oov is not None:
        out = out + oov.unsqueeze(0) * (in_dim & ~kept).to(packed.dtype)
    return out


class _OrderedGather(torch.autograd.Function):
    """``src[pos]`` for a 1-D ``src`` whose backward sums repeated positions in a fixed order (sort, then one
    segment sum per distinct position), so the gradient is bitwise repeatable."""

    @staticmethod
    def forward(ctx, src, pos):
        ctx.save_for_backward(pos)
        ctx.size = src.shape[0]
        return src[pos]

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        out = torch.zeros(ctx.size, dtype=grad.dtype, device=grad.device)
        if pos.numel():
            order = torch.argsort(pos, stable=True)
            uniq, counts = torch.unique_consecutive(pos[order], return_counts=True)
            out[uniq] = torch.segment_reduce(grad[order], "sum", lengths=counts)
        return out, None


class _SparseGather(torch.autograd.Function):
    """``src[pos]`` for a 1-D ``src`` whose gradient is a sparse COO tensor (one entry per gathered element)."""

    @staticmethod
    def forward(ctx, src, pos):
        ctx.save_for_backward(pos)
        ctx.size = src.shape[0]
        return src[pos]

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(pos.unsqueeze(0), grad, (ctx.size,), check_invariants=False), None


# =========================================================================================== sparse_row_update
@torch.no_grad()
def sparse_row_update(weight: torch.Tensor, indices: torch.Tensor, grad_rows: torch.Tensor,
                      state1: torch.Tensor | None = None, state2: torch.Tensor | None = None, *,
                      optimizer: str = "sgd", lr: float, eps: float = 1e-8, beta1: float = 0.9, beta2: float = 0.999,
                      weight_decay: float = 0.0, step: int = 1) -> None:
    """Reference of :func:`optembed_ext.ops.sparse_row_update` (updates ``weight`` and the states in place).

    For each distinct row ``r`` of ``indices``: ``g = sum of grad_rows[i] over indices[i] == r``
    (``+ weight_decay * w[r]``), then an SGD / row-wise Adagrad / lazy Adam step on that row only.
    """
    if optimizer not in ("sgd", "adagrad", "adam"):
        raise ValueError(f"optimizer must be 'sgd', 'adagrad' or 'adam', got {optimizer!r}")
    if indices.numel() == 0:
        return
    N, D = weight.shape
    idx = indices.long().reshape(-1)
    _check_index_range(idx, N, "indices")
    acc = acc_dtype(weight.dtype)
    uniq, inv = torch.unique(idx, return_inverse=True)
    g = torch.zeros(uniq.numel(), D, dtype=acc, device=weight.device)
    g.index_add_(0, inv, grad_rows.reshape(-1, D).to(acc))
    w = weight[uniq].to(acc)
    if weight_decay != 0:
        g = g + weight_decay * w
    if optimizer == "sgd":
        w = w - lr * g
    elif optimizer == "adagrad":
        s = state1[uniq] + g.pow(2).mean(dim=1)
        state1[uniq] = s
        w = w - lr * g / (s.sqrt() + eps).unsqueeze(1)
    else:
        m = beta1 * state1[uniq] + (1 - beta1) * g
        v = beta2 * state2[uniq] + (1 - beta2) * g * g
        state1[uniq] = m
        state2[uniq] = v
        bc1 = 1 - beta1 ** step
        bc2 = 1 - beta2 ** step
        w = w - (lr / bc1) * m / (v.sqrt() / math.sqrt(bc2) + eps)
    weight[uniq] = w.to(weight.dtype)
