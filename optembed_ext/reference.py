"""Pure-PyTorch reference implementations of the fused ops in :mod:`optembed_ext.ops`.

Every function has the same name and signature as its counterpart in :mod:`optembed_ext.ops` and is written as a
plain autograd expression of the op's formula (see the header comment of ``csrc/<op>.cpp``). They serve three
purposes: the test oracle of the compiled kernels, the fallback when the compiled extension is unavailable
(or when ``optembed_ext.ops.use_reference(True)`` / ``OPTEMBED_USE_REFERENCE=1`` asks for it), and readable
documentation of the semantics.

The references validate what the kernels validate at run time (index ranges, ``dims`` ranges, NaN thresholds,
the packed layout of ``compact_embedding``), with the same exception types and messages naming the argument, and
treat non-finite values and unchecked out-of-range ids as the kernels do; shape/dtype checks live in
:mod:`optembed_ext.ops`, which validates before dispatching to either implementation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["masked_embedding", "masked_embedding_backward_update", "row_mask", "compact_embedding", "sparse_row_update",
           "lazy_decay_catch_up", "step_ste_grad", "acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the ops: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_index_range(indices: torch.Tensor, n: int, name: str) -> None:
    """IndexError naming the first entry (row-major) of ``indices`` outside ``[0, n)``, worded as the kernels."""
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= n)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        where = ", ".join(str(i) for i in pos)
        value = int(indices[pos])
        if name == "field_of_row":
            raise IndexError(f"row_mask: field_of_row[{where}] = {value} is out of range for threshold with "
                             f"F = {n} fields")
        raise IndexError(f"{name}[{where}] = {value} is out of range for weight with N = {n} rows "
                         f"(valid ids are 0 <= id < N)")


def _check_threshold_not_nan(threshold: torch.Tensor, op: str) -> None:
    if threshold.numel() and bool(torch.isnan(threshold).any()):
        f = int(torch.isnan(threshold).nonzero()[0, 0])
        raise ValueError(f"{op}: threshold[{f}] is NaN")


# ============================================================================================ masked_embedding
def step_ste_grad(x: torch.Tensor) -> torch.Tensor:
    """Long-tail straight-through estimator of the unit step's derivative (OptEmbed):
    ``H(x) = 2 - 4|x|`` for ``|x| <= 0.4``, ``0.4`` for ``0.4 < |x| <= 1``, ``0`` otherwise (``+-inf`` included),
    NaN for NaN ``x``."""
    ax = x.abs()
    h = torch.where(ax <= 0.4, 2.0 - 4.0 * ax, torch.where(ax <= 1.0, torch.full_like(x, 0.4), torch.zeros_like(x)))
    return torch.where(torch.isnan(x), x, h)


def masked_embedding(weight: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor | None = None,
                     dims: torch.Tensor | None = None, p: int = 1, oov_weight: torch.Tensor | None = None, *,
                     check_indices: bool = True, deterministic: bool = False, sparse: bool = False) -> torch.Tensor:
    """Reference of :func:`optembed_ext.ops.masked_embedding` (same arguments, output ``(B, F, D)``).

    ``n = ||weight[r]||_p``, ``m = step(n - threshold[f])`` (1 without threshold) with the long-tail STE as its
    derivative, ``out[b, f, :k] = m * w[r, :k] + (1 - m) * oov[f, :k]`` and zeros beyond ``k = dims[b, f]``.

    Non-finite values follow IEEE arithmetic with ``step(NaN) = H(NaN) = NaN``: a NaN ``x = n - threshold[f]``
    (NaN in the row, a NaN threshold when unchecked, ``inf - inf``) gives NaN in ``out[b, f, :k]`` and in the
    gradients of that row (all of it), of ``threshold[f]`` and of ``oov[f, :k]``; ``x = -inf`` / ``+inf``
    (threshold ``+inf`` / ``-inf``) prunes / keeps with ``H = 0`` (no STE term, never ``0 * inf``).
    ``check_indices=False``: no data checks; an id outside ``[0, N)`` yields a zero row (no gradient), ``dims``
    are clamped to ``[0, D]``.
    """
    del deterministic  # autograd of this expression has a fixed order on the CPU
    N, D = weight.shape
    B, nf = indices.shape
    idx = indices.long()
    dev = weight.device
    k = None if dims is None else torch.as_tensor(dims, device=dev).long()
    # Data checks look at the lookups only (as the kernels): without lookups nothing is checked.
    if check_indices and idx.numel():
        if threshold is not None:
            _check_threshold_not_nan(threshold, "masked_embedding_forward")
        _check_index_range(idx, N, "indices")
        if k is not None:
            bad_k = (k < 0) | (k > D)
            if bool(bad_k.any()):
                bad = bad_k.nonzero()[0]
                raise ValueError(f"dims{bad.tolist()} = {int(k[tuple(bad)])} must lie in [0, D = {D}]")
    valid = None
    if not check_indices and idx.numel():
        # never index outside the table: invalid ids read row 0 and are zeroed below (no gradient); no
        # data-dependent branch, so the reference traces under torch.compile / torch.export
        valid = (idx >= 0) & (idx < N)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
    rows = F.embedding(idx, weight, sparse=sparse)  # (B, F, D); every weight gradient flows through here
    if valid is not None:
        rows = torch.where(valid.unsqueeze(-1), rows, torch.zeros_like(rows))
    keep_cols = None
    if k is not None:
        k = k.clamp(0, D)
        if k.dim() == 1:
            k = k.unsqueeze(0)
        keep_cols = torch.arange(D, device=dev) < k.unsqueeze(-1)  # (1 or B, F, D)

    def prefix(t: torch.Tensor) -> torch.Tensor:  # exact zeros beyond k (no 0 * NaN), no gradient there
        return t if keep_cols is None else torch.where(keep_cols, t, torch.zeros((), dtype=t.dtype, device=dev))

    if threshold is None:
        out = prefix(rows)
    else:
        acc = acc_dtype(weight.dtype)
        t = threshold.to(acc)
        rows_d = rows.detach()
        x_d = torch.linalg.vector_norm(rows_d, ord=p, dim=-1, dtype=acc) - t.detach()  # (B, F)
        h = step_ste_grad(x_d)  # NaN for NaN x, 0 for |x| > 1 (including +-inf)
        active = h != 0  # lookups with an STE term (NaN included)
        # The norm carries a gradient only where the STE is active: elsewhere its derivative is a hard zero, even
        # for rows with inf entries (no 0 * inf = NaN through the norm's backward).
        rows_n = torch.where(active.unsqueeze(-1), rows, rows_d)
        x = torch.linalg.vector_norm(rows_n, ord=p, dim=-1, dtype=acc) - t  # subgradient 0 at n = 0 (p = 2)
        hard = torch.where(torch.isnan(x_d), x_d, (x_d > 0).to(acc))  # step(x): 1, 0, or NaN
        ste = torch.where(active, h * (x - x.detach()), torch.zeros_like(x))  # value 0 (NaN if x is), slope H
        m = (hard + ste).to(weight.dtype).unsqueeze(-1)
        if oov_weight is not None:
            out = prefix(m * prefix(rows) + (1 - m) * prefix(oov_weight.unsqueeze(0)))
        else:
            out = prefix(m * prefix(rows))
    if valid is not None:
        out = torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=dev))
    return out


def masked_embedding_backward_update(grad_out: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor,
                                     threshold: torch.Tensor | None, dims: torch.Tensor | None, p: int,
                                     oov_weight: torch.Tensor | None, state1: torch.Tensor | None,
                                     state2: torch.Tensor | None, *, optimizer: str, lr: float, eps: float = 1e-8,
                                     beta1: float = 0.9, beta2: float = 0.999, weight_decay: float = 0.0,
                                     step: int = 1, last_step: torch.Tensor | None = None
                                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Reference of the masked lookup's backward with the optimizer step fused in: the per-lookup gradient rows of
    :func:`masked_embedding` (``sparse=True``) handed to :func:`sparse_row_update` (``weight`` and the states are
    updated in place). Returns ``(grad_threshold, grad_oov)`` (None where the argument is None). Ids outside
    ``[0, N)`` raise ``IndexError`` before anything is written."""
    _check_index_range(indices.long(), weight.shape[0], "indices")
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (weight, threshold, oov_weight)]
    with torch.enable_grad():
        out = masked_embedding(leaves[0], indices, leaves[1], dims, p, leaves[2], check_indices=False, sparse=True)
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
    grads = iter(grads)
    gw, gt, goov = (next(grads) if t is not None else None for t in leaves)
    if gw is None:  # no lookups
        gw = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long, device=weight.device),
                                     weight.new_zeros(0, weight.shape[1]), weight.shape)
    if threshold is not None and gt is None:
        gt = torch.zeros_like(threshold)
    if oov_weight is not None and goov is None:
        goov = torch.zeros_like(oov_weight)
    sparse_row_update(weight, gw._indices()[0], gw._values(), state1, state2, optimizer=optimizer, lr=lr, eps=eps,
                      beta1=beta1, beta2=beta2, weight_decay=weight_decay, step=step, last_step=last_step)
    return gt, goov


def _adagrad_decay_sum(a0: torch.Tensor, q: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    """sum over the k skipped steps s of 1 / (sqrt(a0 + s q) + eps), as the integral over s in [1/2, k + 1/2]
    (float64; written without cancellation: u1 - u0 = k q / (u1 + u0))."""
    u0 = torch.sqrt(a0 + 0.5 * q)
    u1 = torch.sqrt(a0 + (k + 0.5) * q)
    lin = 2 * k / (u1 + u0)
    safe_q = torch.where(q > 0, q, torch.ones_like(q))
    log_term = (2 * eps / safe_q) * torch.log1p(k * q / ((u1 + u0) * (u0 + eps)))
    integral = lin - log_term
    return torch.where(q > 0, integral, k / (torch.sqrt(a0) + eps))


def lazy_decay_catch_up(weight: torch.Tensor, rows: torch.Tensor, last_step: torch.Tensor,
                        state1: torch.Tensor | None = None, state2: torch.Tensor | None = None, *, optimizer: str,
                        lr: float, eps: float = 1e-8, beta1: float = 0.9, beta2: float = 0.999,
                        weight_decay: float = 0.0, upto: int) -> None:
    """Lazy weight decay: catches the distinct ``rows`` up to step ``upto`` (in place), i.e. applies the
    ``k = upto - last_step[r]`` steps (where ``k > 0``) in which a dense optimizer would have updated row ``r``
    with the decay gradient ``g = weight_decay * w[r]`` alone; then ``last_step[r] = max(last_step[r], upto)``.
    In the accumulation dtype, with ``lr`` etc. the current hyper-parameters:

    - sgd: ``w *= (1 - lr * wd) ** k`` -- exactly the k skipped SGD steps.
    - adagrad (row-wise): with ``w`` held at its start value, the accumulator grows by ``q = wd**2 * mean(w**2)``
      per skipped step: ``a_s = a + s q``, ``a += k q``; the weight shrinks by ``w *= exp(-lr * wd * S)`` with
      ``S`` = sum over the steps of ``1 / (sqrt(a_s) + eps)``, taken as the integral over ``s`` in ``[1/2, k + 1/2]``
      (closed form) -- a product of factors ``1 - lr * wd / (sqrt(a_s) + eps)`` written as one exponential.
    - adam: ``g = wd * w`` held at the window's start (the decay gradient of a row that shrinks little over the
      window); the moments take their exact values for k steps of that constant ``g``:
      ``m = beta1**k m + (1 - beta1**k) g``, ``v = beta2**k v + (1 - beta2**k) g**2``; the weight moves by k steps
      of the size of the window's last one, ``w -= k * lr / (1 - beta1**(upto)) * m / (sqrt(v) /
      sqrt(1 - beta2**(upto)) + eps)``, an entry stopping at 0 instead of crossing it.

    The SGD rule is exact. For Adam the result differs from k dense steps because (a) ``m`` and ``v`` of the
    skipped steps are not replayed one by one (the first steps of the window, still dominated by the last real
    gradient's moments, are sized like the last step) and (b) a dense run oscillates around 0 with amplitude
    about ``lr`` once an entry reaches it, where the catch-up stops at 0. Both move an entry toward 0 by at most
    ``k`` Adam steps; tests/test_fused_update.py measures the gap against k dense steps.
    """
    if weight_decay == 0 or rows.numel() == 0 or upto < 1:
        if rows.numel():
            last_step[rows] = torch.clamp(last_step[rows], min=upto)
        return
    acc = acc_dtype(weight.dtype)
    k = (upto - last_step[rows]).clamp(min=0)
    todo = k > 0
    rows, k = rows[todo], k[todo]
    if rows.numel() == 0:
        return
    kf = k.to(torch.float64)
    w = weight[rows].to(acc)
    D = weight.shape[1]
    if optimizer == "sgd":
        f = torch.pow(torch.full_like(kf, 1.0 - lr * weight_decay), kf).to(acc)
        w = w * f.unsqueeze(1)
    elif optimizer == "adagrad":
        ms = (w * w).sum(dim=1) / D if D else torch.zeros_like(kf, dtype=acc)
        a0 = state1[rows].to(torch.float64)
        q = weight_decay * weight_decay * ms.to(torch.float64)
        state1[rows] = (a0 + kf * q).to(acc)
        f = torch.exp(-lr * weight_decay * _adagrad_decay_sum(a0, q, kf, eps)).to(acc)
        w = w * f.unsqueeze(1)
    else:
        b1k = torch.pow(torch.full_like(kf, beta1), kf).to(acc).unsqueeze(1)
        b2k = torch.pow(torch.full_like(kf, beta2), kf).to(acc).unsqueeze(1)
        g = weight_decay * w
        m = b1k * state1[rows] + (1 - b1k) * g
        v = b2k * state2[rows] + (1 - b2k) * g * g
        state1[rows] = m
        state2[rows] = v
        step_size = lr / (1 - beta1 ** upto)
        inv_sqrt_bc2 = 1.0 / math.sqrt(1 - beta2 ** upto)
        w1 = w - (kf.to(acc) * step_size).unsqueeze(1) * m / (v.sqrt() * inv_sqrt_bc2 + eps)
        crossed = ((w > 0) & (w1 < 0)) | ((w < 0) & (w1 > 0))
        w = torch.where(crossed, torch.zeros((), dtype=acc, device=w.device), w1)
    weight[rows] = w.to(weight.dtype)
    last_step[rows] = upto


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
def _compact_layout_rows(packed: torch.Tensor, field_offsets: torch.Tensor, field_dims: torch.Tensor,
                         out_dim: int) -> list[int]:
    """Validates the packed layout as the kernels do (same ValueError messages) and returns the rows ``R_f`` of
    each field's block (``-1`` for a field with ``field_dims == 0``: nothing is read, any row is allowed)."""
    offs = [int(v) for v in field_offsets.tolist()]
    dims = [int(v) for v in field_dims.tolist()]
    nf = len(dims)
    P = packed.numel()
    if offs[0] < 0:
        raise ValueError(f"compact_embedding: field_offsets[0] must be >= 0, got {offs[0]}")
    if offs[nf] > P:
        raise ValueError(f"compact_embedding: field_offsets[F] = {offs[nf]} exceeds packed.numel() = {P}")
    rows = []
    for f, d in enumerate(dims):
        if not 0 <= d <= out_dim:
            raise ValueError(f"compact_embedding: field_dims[{f}] = {d} must lie in [0, out_dim = {out_dim}]")
        length = offs[f + 1] - offs[f]
        if length < 0:
            raise ValueError(f"compact_embedding: field_offsets must be non-decreasing, field_offsets[{f}] = "
                             f"{offs[f]} > field_offsets[{f + 1}] = {offs[f + 1]}")
        if d == 0:
            if length != 0:
                raise ValueError(f"compact_embedding: field {f} has field_dims 0 but a non-empty block of {length} "
                                 f"values in packed (field_offsets[{f}] = {offs[f]}, field_offsets[{f + 1}] = "
                                 f"{offs[f + 1]})")
            rows.append(-1)
        else:
            if length % d != 0:
                raise ValueError(f"compact_embedding: block of field {f} in packed has {length} values "
                                 f"(field_offsets[{f + 1}] - field_offsets[{f}]), not a multiple of "
                                 f"field_dims[{f}] = {d}")
            rows.append(length // d)
    return rows


def _compact_rows(remap: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``r = remap[indices]`` (B, F), with ``-2`` for an invalid lookup (id outside ``[0, N)``, or remapped row
    outside ``[-1, R_f)`` for a field with ``D_f > 0``); never indexes outside ``remap``."""
    n = remap.numel()
    idx = indices.long()
    ok = (idx >= 0) & (idx < n)
    r = remap.long()[torch.where(ok, idx, torch.zeros_like(idx))] if n else torch.zeros_like(idx)
    ok = ok & (r >= -1) & ((rows < 0) | (r < rows)).expand_as(r)
    return torch.where(ok, r, torch.full_like(r, -2))


def compact_embedding(packed: torch.Tensor, field_offsets: torch.Tensor, field_dims: torch.Tensor,
                      remap: torch.Tensor, indices: torch.Tensor, out_dim: int, oov: torch.Tensor | None = None, *,
                      check_indices: bool = True, deterministic: bool = False, sparse: bool = False) -> torch.Tensor:
    """Reference of :func:`optembed_ext.ops.compact_embedding` (output ``(B, F, out_dim)``).

    ``r = remap[indices[b, f]]``; ``out[b, f, j] = packed[field_offsets[f] + r * D_f + j]`` for ``r >= 0`` and
    ``j < D_f``, ``oov[f, j]`` (or 0) for ``r == -1`` and ``j < D_f``, and 0 for ``j >= D_f``.

    The layout (``field_offsets``, ``field_dims``, ``out_dim``) is always validated as by the kernels (ValueError
    naming the argument); with ``check_indices`` every looked-up id and remapped row is validated too (IndexError
    naming ``indices`` / ``remap``, first bad lookup); without, an invalid lookup yields zeros and no gradient.
    """
    B, nf = indices.shape
    dev = packed.device
    if torch.compiler.is_compiling():
        return _compact_embedding_traceable(packed, field_offsets, field_dims, remap, indices, out_dim, oov)
    rows_f = torch.tensor(_compact_layout_rows(packed, field_offsets, field_dims, out_dim), dtype=torch.long,
                          device=dev)
    d = field_dims.long()
    off = field_offsets.long()
    n = remap.numel()
    r = _compact_rows(remap, indices, rows_f.unsqueeze(0))  # (B, F), -2 = invalid
    if check_indices and r.numel():
        bad = r == -2
        if bool(bad.any()):
            b, f = (int(i) for i in bad.nonzero()[0])
            i = int(indices[b, f])
            if not 0 <= i < n:
                raise IndexError(f"compact_embedding: indices[{b}, {f}] = {i} is out of range [0, N = {n}) "
                                 f"where N = remap.numel()")
            raise IndexError(f"compact_embedding: remap[{i}] = {int(remap[i])} (looked up by indices[{b}, {f}]) "
                             f"is out of range [-1, {int(rows_f[f])}) for field {f} (rows in its block of packed)")
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
        out = out + oov.unsqueeze(0) * (in_dim & (r == -1).unsqueeze(-1)).to(packed.dtype)
    return out


def _compact_embedding_traceable(packed, field_offsets, field_dims, remap, indices, out_dim, oov):
    """The same lookup with fixed shapes and no host reads, for ``torch.compile`` / ``torch.export`` of the
    fallback: the layout and index checks (host reads) are left to eager calls and to the module, which validates
    its layout once; an invalid lookup yields zeros, as unchecked."""
    B, nf = indices.shape
    dev = packed.device
    d = field_dims.long()
    off = field_offsets.long()
    rows_f = torch.where(d > 0, (off[1:nf + 1] - off[:nf]) // d.clamp(min=1), torch.full_like(d, -1))
    r = _compact_rows(remap, indices, rows_f.unsqueeze(0))  # (B, F), -2 = invalid
    cols = torch.arange(out_dim, device=dev)
    in_dim = cols.view(1, 1, -1) < d.view(1, -1, 1)
    sel = in_dim & (r >= 0).unsqueeze(-1)  # (B, F, out_dim)
    pos = off[:nf].view(1, -1, 1) + r.clamp(min=0).unsqueeze(-1) * d.view(1, -1, 1) + cols.view(1, 1, -1)
    pos = torch.where(sel, pos, torch.zeros_like(pos)).clamp(0, max(packed.numel() - 1, 0))
    vals = packed[pos] if packed.numel() else torch.zeros(pos.shape, dtype=packed.dtype, device=dev)
    out = torch.where(sel, vals, torch.zeros((), dtype=packed.dtype, device=dev))
    if oov is not None:
        out = out + oov.unsqueeze(0) * (in_dim & (r == -1).unsqueeze(-1)).to(packed.dtype)
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
                      weight_decay: float = 0.0, step: int = 1, check_indices: bool = True,
                      last_step: torch.Tensor | None = None) -> None:
    """Reference of :func:`optembed_ext.ops.sparse_row_update` (updates ``weight`` and the states in place).

    For each distinct row ``r`` of ``indices``: ``g = sum of grad_rows[i] over indices[i] == r``
    (``+ weight_decay * w[r]``), then an SGD / row-wise Adagrad / lazy Adam step on that row only. With
    ``last_step`` (lazy weight decay) each such row is first caught up to step ``step - 1``
    (:func:`lazy_decay_catch_up`) and stamped ``last_step[r] = step``.
    ``check_indices=True`` raises IndexError on the first id outside ``[0, N)`` before anything is written;
    with ``check_indices=False`` such ids are skipped (they update nothing).
    """
    if optimizer not in ("sgd", "adagrad", "adam"):
        raise ValueError(f"optimizer must be 'sgd', 'adagrad' or 'adam', got {optimizer!r}")
    N, D = weight.shape
    idx = indices.long().reshape(-1)
    grad_rows = grad_rows.reshape(idx.numel(), D)
    if idx.numel() == 0:
        return
    valid = (idx >= 0) & (idx < N)
    if not bool(valid.all()):
        if check_indices:
            i = int((~valid).nonzero()[0, 0])
            raise IndexError(f"sparse_row_update: indices[{i}] = {int(idx[i])} is out of range [0, {N}) for weight "
                             f"with {N} rows")
        idx, grad_rows = idx[valid], grad_rows[valid]
    if idx.numel() == 0 or D == 0:  # D = 0: the ids are still checked, nothing to update
        return
    acc = acc_dtype(weight.dtype)
    uniq, inv = torch.unique(idx, return_inverse=True)
    g = torch.zeros(uniq.numel(), D, dtype=acc, device=weight.device)
    g.index_add_(0, inv, grad_rows.to(acc))
    if last_step is not None:
        lazy_decay_catch_up(weight, uniq, last_step, state1, state2, optimizer=optimizer, lr=lr, eps=eps, beta1=beta1,
                            beta2=beta2, weight_decay=weight_decay, upto=step - 1)
        last_step[uniq] = step
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
