"""End-to-end benchmarks: one OptEmbed supernet training step and one evaluation batch of a DeepFM.

Model: :class:`optembed_ext.nn.optembed.OptEmbedEmbedding` (learned per-field thresholds, p = 1) inside
``optembed_ext.models`` DeepFM (MLP 1024-512-256 with batch norm at Criteo scale, 64-32 on the small shape).

Modes:

``train_step``  supernet training step as the trainer runs it: per-sample random dims in 1..D, forward, BCE +
                threshold regulariser, backward, optimizer step.
``eval``        ``model.eval()`` forward of an evaluation batch (4 x the training batch, 8192 at Criteo scale) under
                ``torch.no_grad()`` (full dims, threshold mask).

Implementations (baseline first):

``reference``     the model with ``optembed_ext.ops.use_reference(True)`` (pure-PyTorch ops), dense ``torch.optim.Adam``
``fused``         the compiled ops, dense table gradient, dense ``torch.optim.Adam`` (the trainer's ``adam``)
``fused_sparse``  (train_step only) ``masked_embedding(sparse=True)`` + :class:`optembed_ext.optim.LazyAdam` for the
                  table (``ops.sparse_row_update``), ``torch.optim.Adam`` for thresholds and the dense network
``fused_bwd``     (train_step only) the same lazy Adam applied inside the lookup's backward
                  (:class:`optembed_ext.optim.FusedBackwardOptimizer`, the trainer's ``fused_bwd_adam``: no gradient
                  rows at all), ``torch.optim.Adam`` for the rest

Throughput is reported in samples/s; no GB/s (the MLP dominates the time at Criteo scale).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, Shape, make_dims, make_ids, run_case, shape_params
from optembed_ext import _ext, optim
from optembed_ext.data import FeatureMap
from optembed_ext.models import build_model
from optembed_ext.nn.optembed import OptEmbedEmbedding

ops = pytest.importorskip("optembed_ext.ops")

SUITE = "training_step"
IMPLS = ("reference", "fused", "fused_sparse", "fused_bwd")  # baseline first
LR = 1e-3
EVAL_BATCH_FACTOR = 4


def mlp_dims(shape: Shape) -> tuple[int, ...]:
    return (1024, 512, 256) if shape.name.startswith("criteo") else (64, 32)


def build(shape: Shape, device):
    fmap = FeatureMap("bench", [f"f{i}" for i in range(shape.fields)], shape.cardinalities())
    torch.manual_seed(0)
    emb = OptEmbedEmbedding(fmap, shape.dim, norm=1, check_indices=True)
    with torch.no_grad():  # thresholds just below the typical row norm: a realistic, partly pruned supernet
        emb.threshold.fill_(float(emb.weight[:1000].abs().sum(dim=1).mean()) * 0.9)
    model = build_model("deepfm", fmap, emb, mlp_dims=mlp_dims(shape)).to(device)
    return model, emb


def make_step(model, emb: OptEmbedEmbedding, impl: str, ids, labels, dims):
    """A closure running one supernet training step with ``impl``."""
    if impl in ("fused_sparse", "fused_bwd"):
        table = [emb.weight]
        rest = [p for p in model.parameters() if p is not emb.weight]
        first = (optim.LazyAdam(table, lr=LR) if impl == "fused_sparse"
                 else optim.FusedBackwardOptimizer(table, kind="adam", lr=LR))
        opts = [first, torch.optim.Adam(rest, lr=LR)]
    else:
        opts = [torch.optim.Adam(model.parameters(), lr=LR)]

    def step():
        for o in opts:
            o.zero_grad(set_to_none=True)
        emb.set_dims(dims)
        if impl == "fused_sparse":
            out = ops.masked_embedding(emb.weight, ids, emb.threshold, dims, emb.norm, emb.oov_weight,
                                       check_indices=True, sparse=True)
            logits = model.predict_from_embeddings(out, ids)
        else:
            logits = model(ids)
        loss = F.binary_cross_entropy_with_logits(logits, labels) + emb.regularization()
        loss.backward()
        for o in opts:
            o.step()
        return loss

    step.opts = opts
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["train_step", "eval"])
@pytest.mark.parametrize("shape", shape_params())
@pytest.mark.parametrize("device", DEVICES)
def test_training_step(benchmark, request, device, shape, mode, impl):
    if impl != "reference" and not _ext.HAS_EXTENSION:
        pytest.skip("compiled extension not available: ops would fall back to the reference")
    if mode == "eval" and impl in ("fused_sparse", "fused_bwd"):
        pytest.skip("evaluation has no optimizer: identical to 'fused'")
    batch = shape.batch * (EVAL_BATCH_FACTOR if mode == "eval" else 1)
    bshape = replace(shape, batch=batch)
    ids = make_ids(bshape, "zipf", device)
    labels = (torch.rand(batch, generator=torch.Generator().manual_seed(3)) < 0.25).float().to(device)
    dims = make_dims(bshape, device)
    model, emb = build(shape, device)

    ops.use_reference(impl == "reference")
    try:
        if mode == "train_step":
            model.train()
            if impl != "reference":  # correctness gate: the training-mode logits match the reference ops' logits
                emb.set_dims(dims)
                with torch.no_grad():
                    ops.use_reference(True)
                    want = model(ids)
                    ops.use_reference(False)
                    if impl == "fused_sparse":
                        out = ops.masked_embedding(emb.weight, ids, emb.threshold, dims, emb.norm, emb.oov_weight,
                                                   sparse=True)
                        got = model.predict_from_embeddings(out, ids)
                    else:
                        got = model(ids)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            fn = make_step(model, emb, impl, ids, labels, dims)
            for o in fn.opts:
                if isinstance(o, optim.FusedBackwardOptimizer):
                    request.addfinalizer(o.detach)
        else:
            model.eval()
            emb.set_dims(None)

            def fn():
                with torch.no_grad():
                    return model(ids)

            if impl != "reference":
                ops.use_reference(True)
                want = fn()
                ops.use_reference(False)
                torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4)

        fn()  # warm-up
        run_case(benchmark, request, fn, suite=SUITE, case=f"{mode} deepfm {shape.name}", device=device, impl=impl,
                 items=batch, item_name="samples")
    finally:
        ops.use_reference(False)
