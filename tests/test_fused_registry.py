"""The registry of fused-backward tables (ops.fuse_update): it forgets tables that die, compiled graphs do not
trip over it, and an optimizer whose tables were never updated by a fused backward says so."""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

from optembed_ext import ops, optim


def _lookup(w, idx):
    return ops.masked_embedding(w, idx, None, None, 1, None, check_indices=False)


def test_a_table_that_dies_registered_leaves_no_stale_count():
    before = ops._FUSED_COUNT[0]
    w = torch.nn.Parameter(torch.randn(10, 4))
    opt = optim.FusedBackwardOptimizer([w], kind="sgd", lr=0.1)
    assert ops._FUSED_COUNT[0] == before + 1 and ops.fused_update_of(w) is not None
    del opt, w
    gc.collect()
    assert ops._FUSED_COUNT[0] == before


def test_compiled_lookup_with_a_live_registration_compiles_fullgraph_and_the_optimizer_warns():
    torch._dynamo.reset()
    w = torch.nn.Parameter(torch.randn(12, 4))
    opt = optim.FusedBackwardOptimizer([w], kind="sgd", lr=0.1)
    idx = torch.tensor([[1, 2], [3, 1]])
    compiled = torch.compile(_lookup, fullgraph=True, backend="eager")
    out = compiled(w, idx)  # no graph break on the registry lookup
    torch.testing.assert_close(out, w.detach()[idx])
    out.sum().backward()  # the compiled graph applies no fused update: the table gets a plain gradient
    assert w.grad is not None
    opt.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="received no fused backward"):
        opt.step()
    with warnings.catch_warnings():  # once per optimizer
        warnings.simplefilter("error")
        opt.step()
    opt.detach()


def test_an_eager_fused_backward_does_not_warn():
    w = torch.nn.Parameter(torch.randn(12, 4))
    opt = optim.FusedBackwardOptimizer([w], kind="sgd", lr=0.1)
    w0 = w.detach().clone()
    idx = torch.tensor([[1, 2], [3, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.zero_grad()
            _lookup(w, idx).sum().backward()
            opt.step()
    assert not torch.equal(w.detach()[1], w0[1]) and torch.equal(w.detach()[0], w0[0])
    opt.detach()
