"""Benchmarks of ``optembed_ext.ops.masked_embedding`` against ``optembed_ext.reference.masked_embedding``.

Modes (each case checks the fused result against the reference once, then times both in the same session):

``forward``         training forward (autograd graph recorded): gather + row norm + threshold mask + dims mask
``backward``        backward only (``torch.autograd.grad`` on a retained graph), dense table gradient
``fwd_bwd``         forward + backward, dense table gradient (target: fused >= 3x reference at Criteo shape, CPU)
``fwd_bwd_sparse``  forward + backward with ``sparse=True`` (per-lookup gradient rows, COO)
``fwd_bwd_adam``    forward + backward + optimizer step: fused = ``masked_embedding(sparse=True)`` + lazy Adam
                    (:class:`optembed_ext.optim.LazyAdam`, i.e. ``ops.sparse_row_update``); reference = reference
                    forward + backward with a dense gradient + dense ``torch.optim.Adam``

Variants: ``plain`` (no threshold, full dims: a plain lookup) and ``supernet`` (per-field thresholds, p = 1, random
per-sample dims in 1..D: the OptEmbed supernet training configuration).

GB/s counts the bytes the fused algorithm must move (see :func:`masked_bytes`); the reference is charged the same
count, so the two GB/s figures compare like the two times.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import (DEVICES, Shape, assert_close, dist_params, make_dims, make_ids, make_table, make_threshold,
                      run_case, shape_params, unique_rows)
from optembed_ext import _ext, optim, reference

ops = pytest.importorskip("optembed_ext.ops")

SUITE = "masked_embedding"
MODES = ("forward", "backward", "fwd_bwd", "fwd_bwd_sparse", "fwd_bwd_adam")
VARIANTS = ("plain", "supernet")
IMPLS = ("reference", "fused")  # baseline first
#: minimum speedup of the fused op over the reference (CPU, Criteo-scale shapes)
TARGETS = {"fwd_bwd": 3.0}
LR = 1e-3


def masked_bytes(shape: Shape, mode: str, variant: str, n_unique: int, elem: int = 4, index_elem: int = 8) -> int:
    """Bytes the fused kernels must move for one call of ``mode`` (each lookup reads its table row once)."""
    L, D, N = shape.lookups, shape.dim, shape.rows
    masked = variant == "supernet"
    row = D * elem
    fwd = L * index_elem + L * row + L * row + L * 4  # ids, table rows, output, norms
    if masked:
        fwd += L * 8  # per-sample dims
    bwd = L * index_elem + L * row  # ids, grad_out
    if masked:
        bwd += L * row + L * 4 + L * 8  # table rows (STE term), norms, dims
    if mode == "forward":
        return fwd
    if mode == "backward":
        return bwd + N * row  # the dense gradient is written in full
    if mode == "fwd_bwd":
        return fwd + bwd + N * row
    if mode == "fwd_bwd_sparse":
        return fwd + bwd + L * row
    if mode == "fwd_bwd_adam":
        # sparse gradient rows written and read back, then each touched row's w, m, v read and written once
        return fwd + bwd + L * row + L * row + L * index_elem + n_unique * D * (elem + 4 + 4) * 2
    raise ValueError(mode)


class Case:
    """Inputs of one (shape, dist, device, variant) case."""

    def __init__(self, shape: Shape, dist: str, device: str, variant: str):
        self.shape, self.device, self.variant = shape, device, variant
        self.ids = make_ids(shape, dist, device)
        self.weight = make_table(shape, device).requires_grad_(True)
        if variant == "supernet":
            self.threshold = make_threshold(shape, device).requires_grad_(True)
            self.dims = make_dims(shape, device)
        else:
            self.threshold, self.dims = None, None
        g = torch.Generator().manual_seed(1)
        self.grad_out = torch.randn(shape.batch, shape.fields, shape.dim, generator=g).to(device)

    def compact(self) -> "Case":
        """The same lookups on a table holding only the looked-up rows (ids remapped).

        The op is row-local, so outputs and gradients of the touched rows are identical; correctness gates run on
        this copy to keep memory flat at N = 1e7.
        """
        other = object.__new__(Case)
        other.__dict__.update(self.__dict__)
        uniq, local = torch.unique(self.ids, return_inverse=True)
        other.shape = replace(self.shape, rows=int(uniq.numel()))
        other.ids = local.view_as(self.ids)
        other.weight = self.weight.detach()[uniq].clone().requires_grad_(True)
        if self.threshold is not None:
            other.threshold = self.threshold.detach().clone().requires_grad_(True)
        return other

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.threshold] if self.threshold is not None else [])

    def forward(self, impl: str, sparse: bool = False, weight=None, threshold=None) -> torch.Tensor:
        fn = ops.masked_embedding if impl == "fused" else reference.masked_embedding
        w = self.weight if weight is None else weight
        t = self.threshold if threshold is None else threshold
        return fn(w, self.ids, t, self.dims, 1, None, sparse=sparse)

    def grads(self, impl: str, sparse: bool = False):
        out = self.forward(impl, sparse=sparse)
        return out, torch.autograd.grad(out, self.inputs, self.grad_out)


def _require_fused(impl: str) -> None:
    if impl == "fused" and not _ext.HAS_EXTENSION:
        pytest.skip("compiled extension not available: ops would fall back to the reference")


def _adam_step_fn(case: Case, impl: str, copy: bool = True):
    """A closure doing one training step of the table (and thresholds) with ``impl``'s optimizer.

    ``copy=False`` trains ``case.weight`` / ``case.threshold`` themselves (no extra table in memory).
    """
    weight, threshold = case.weight, case.threshold
    if copy:
        weight = weight.detach().clone().requires_grad_(True)
        threshold = None if threshold is None else threshold.detach().clone().requires_grad_(True)
    dense = [threshold] if threshold is not None else []
    if impl == "fused":
        table_opt = optim.LazyAdam([weight], lr=LR)
        opts = [table_opt] + ([torch.optim.Adam(dense, lr=LR)] if dense else [])
    else:
        opts = [torch.optim.Adam([weight] + dense, lr=LR)]

    def step():
        for o in opts:
            o.zero_grad(set_to_none=True)
        out = case.forward(impl, sparse=impl == "fused", weight=weight, threshold=threshold)
        out.backward(case.grad_out)
        for o in opts:
            o.step()

    return step, weight, threshold


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dist", dist_params())
@pytest.mark.parametrize("shape", shape_params())
@pytest.mark.parametrize("device", DEVICES)
def test_masked_embedding(benchmark, request, device, shape, dist, mode, variant, impl):
    _require_fused(impl)
    case = Case(shape, dist, device, variant)
    n_unique = unique_rows(case.ids)

    if mode == "forward":
        if impl == "fused":
            assert_close(case.forward("fused"), case.forward("reference"), "forward output")

        def fn():
            return case.forward(impl)

    elif mode == "backward":
        if impl == "fused":
            small = case.compact()
            got = torch.autograd.grad(small.forward("fused"), small.inputs, small.grad_out, retain_graph=True)
            _, want = small.grads("reference")
            for a, b, name in zip(got, want, ("grad weight", "grad threshold")):
                assert_close(a, b, name)
            del small, got, want
        out = case.forward(impl)

        def fn():
            return torch.autograd.grad(out, case.inputs, case.grad_out, retain_graph=True)

    elif mode in ("fwd_bwd", "fwd_bwd_sparse"):
        sparse = mode == "fwd_bwd_sparse"
        if impl == "fused":
            small = case.compact()
            _, got = small.grads("fused", sparse=sparse)
            _, want = small.grads("reference", sparse=sparse)
            for a, b, name in zip(got, want, ("grad weight", "grad threshold")):
                assert_close(a, b, name)
            del small, got, want

        def fn():
            return case.grads(impl, sparse=sparse)

    else:  # fwd_bwd_adam
        if impl == "fused":
            # From a fresh optimizer state one lazy-Adam step equals one dense Adam step (untouched rows have
            # zero moments, so dense Adam leaves them unchanged too).
            small = case.compact()
            step_f, w_f, t_f = _adam_step_fn(small, "fused")
            step_r, w_r, t_r = _adam_step_fn(small, "reference")
            step_f()
            step_r()
            assert_close(w_f.detach(), w_r.detach(), "table after one Adam step")
            if t_f is not None:
                assert_close(t_f.detach(), t_r.detach(), "threshold after one Adam step")
            del small, step_f, step_r, w_f, w_r
        fn, _, _ = _adam_step_fn(case, impl, copy=False)

    fn()  # warm-up
    on_criteo = shape.name.startswith("criteo") and str(device) == "cpu"
    target = TARGETS.get(mode) if (impl == "fused" and on_criteo) else None
    run_case(benchmark, request, fn, suite=SUITE, case=f"{mode}/{variant} {shape.name} {dist}", device=device,
             impl=impl, nbytes=masked_bytes(shape, mode, variant, n_unique), target=target,
             target_note="target: CPU fused fwd+bwd" if target else None)
