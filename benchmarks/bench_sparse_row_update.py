"""Benchmarks of ``optembed_ext.ops.sparse_row_update`` (fused sparse optimizer step on the touched rows) against
``optembed_ext.reference.sparse_row_update`` and, where torch has an equivalent, torch's own sparse optimizer.

Input: the per-lookup gradient rows of one batch (``M = B * F`` rows, ids repeated as the distribution dictates,
as produced by ``masked_embedding(sparse=True)``). Optimizers: ``sgd``, ``adagrad`` (row-wise), ``adam`` (lazy).
Extra implementation ``torch``: ``torch.optim.SGD`` (sgd) / ``torch.optim.SparseAdam`` (adam) stepping an
uncoalesced sparse COO gradient -- the usual PyTorch way (SparseAdam places eps slightly differently; torch has no
row-wise Adagrad, so that case has no ``torch`` entry).

GB/s = bytes the fused step must move: indices + gradient rows read once, each touched row (and its state) read and
written once.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import DEVICES, Shape, assert_close, dist_params, make_ids, make_table, run_case, shape_params
from optembed_ext import _ext, reference

ops = pytest.importorskip("optembed_ext.ops")

SUITE = "sparse_row_update"
OPTIMIZERS = ("sgd", "adagrad", "adam")
IMPLS = ("reference", "fused", "torch")  # baseline first
HYPER = {"lr": 1e-2, "eps": 1e-8, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0}


def update_bytes(shape: Shape, optimizer: str, n_unique: int, elem: int = 4, index_elem: int = 8) -> int:
    M, D = shape.lookups, shape.dim
    state = {"sgd": 0, "adagrad": 4, "adam": 2 * D * 4}[optimizer]
    return M * index_elem + M * D * elem + n_unique * (D * elem + state) * 2


def make_state(shape: Shape, optimizer: str, device):
    if optimizer == "adagrad":
        return torch.zeros(shape.rows, device=device), None
    if optimizer == "adam":
        return (torch.zeros(shape.rows, shape.dim, device=device),
                torch.zeros(shape.rows, shape.dim, device=device))
    return None, None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dist", dist_params())
@pytest.mark.parametrize("shape", shape_params())
@pytest.mark.parametrize("device", DEVICES)
def test_sparse_row_update(benchmark, request, device, shape, dist, optimizer, impl):
    if impl == "fused" and not _ext.HAS_EXTENSION:
        pytest.skip("compiled extension not available: ops would fall back to the reference")
    if impl == "torch" and optimizer == "adagrad":
        pytest.skip("torch has no row-wise Adagrad")
    indices = make_ids(shape, dist, device).flatten()
    g = torch.Generator().manual_seed(2)
    grad_rows = torch.randn(shape.lookups, shape.dim, generator=g).mul_(1e-2).to(device)
    weight = make_table(shape, device)
    state1, state2 = make_state(shape, optimizer, device)
    n_unique = int(torch.unique(indices).numel())

    if impl == "fused":
        # One step from the same state must match the reference. The update is row-local, so it is checked on the
        # touched rows only (a (U, D) copy with remapped indices) to keep memory flat at N = 1e7.
        uniq, local = torch.unique(indices, return_inverse=True)
        sub = replace(shape, rows=int(uniq.numel()))
        w_f, w_r = weight[uniq].clone(), weight[uniq].clone()
        s_f = tuple(None if x is None else x.uniform_(0.0, 1e-4)  # non-trivial starting state
                    for x in make_state(sub, optimizer, device))
        s_r = tuple(None if x is None else x.clone() for x in s_f)
        ops.sparse_row_update(w_f, local, grad_rows, *s_f, optimizer=optimizer, step=3, **HYPER)
        reference.sparse_row_update(w_r, local, grad_rows, *s_r, optimizer=optimizer, step=3, **HYPER)
        assert_close(w_f, w_r, f"{optimizer} updated table")
        for a, b in zip(s_f, s_r):
            if a is not None:
                assert_close(a, b, f"{optimizer} optimizer state")
        del w_f, w_r, s_f, s_r

    counter = {"step": 0}
    if impl == "torch":
        param = torch.nn.Parameter(weight)
        sparse_grad = torch.sparse_coo_tensor(indices.unsqueeze(0), grad_rows, (shape.rows, shape.dim))
        if optimizer == "sgd":
            opt = torch.optim.SGD([param], lr=HYPER["lr"])
        else:
            opt = torch.optim.SparseAdam([param], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                                         eps=HYPER["eps"])

        def fn():
            param.grad = sparse_grad
            opt.step()
    else:
        update = ops.sparse_row_update if impl == "fused" else reference.sparse_row_update

        def fn():
            counter["step"] += 1
            update(weight, indices, grad_rows, state1, state2, optimizer=optimizer, step=counter["step"], **HYPER)

    fn()  # warm-up
    run_case(benchmark, request, fn, suite=SUITE, case=f"{optimizer} {shape.name} {dist}", device=device, impl=impl,
             nbytes=update_bytes(shape, optimizer, n_unique))
