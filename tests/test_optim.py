"""Fused sparse optimizers (optembed_ext.optim) and their use from the trainer.

Expected values come from torch.optim optimizers on dense gradients (where the rules coincide) or from a dense
float64 re-statement of the lazy rules written here.
"""
import io
import math
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from optembed_ext.optim import FusedSparseOptimizer, LazyAdam, RowWiseAdagrad, SparseSGD, make_fused_optimizer


def _sparse_grad(N, D, idx, rows):
    """Uncoalesced COO gradient, as nn.Embedding(sparse=True) produces it."""
    return torch.sparse_coo_tensor(idx.reshape(1, -1), rows, (N, D), check_invariants=True)


def _lazy_adam_reference(w, grads, lr, betas, eps, wd):
    """Lazy Adam in float64: rows without gradient entries keep w, m, v; bias correction uses the global step."""
    w = w.clone().double()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    b1, b2 = betas
    for t, (idx, rows) in enumerate(grads, start=1):
        G = torch.zeros_like(w).index_add_(0, idx, rows.double())
        touched = torch.zeros(w.shape[0], dtype=torch.bool)
        touched[idx] = True
        g = G[touched] + wd * w[touched]
        m[touched] = b1 * m[touched] + (1 - b1) * g
        v[touched] = b2 * v[touched] + (1 - b2) * g * g
        w[touched] -= lr / (1 - b1 ** t) * m[touched] / (v[touched].sqrt() / math.sqrt(1 - b2 ** t) + eps)
    return w


def _random_grads(N, D, steps, M, gen, high=None, dtype=torch.float64):
    high = N if high is None else high
    return [(torch.randint(0, high, (M,), generator=gen), torch.randn(M, D, generator=gen, dtype=dtype))
            for _ in range(steps)]


def test_lazy_adam_matches_the_lazy_rule():
    gen = torch.Generator().manual_seed(0)
    N, D = 40, 6
    w0 = torch.randn(N, D, generator=gen, dtype=torch.float64)
    grads = _random_grads(N, D, 5, 30, gen, high=20)  # rows >= 20 never touched
    p = nn.Parameter(w0.clone())
    opt = LazyAdam([p], lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.01)
    for idx, rows in grads:
        p.grad = _sparse_grad(N, D, idx, rows)
        opt.step()
    expected = _lazy_adam_reference(w0, grads, 0.02, (0.8, 0.9), 1e-6, 0.01)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(p.detach()[20:], w0[20:])
    assert opt.state[p]["step"] == 5


def test_lazy_adam_equals_torch_adam_when_every_row_is_touched():
    gen = torch.Generator().manual_seed(1)
    N, D = 12, 5
    emb_fused = nn.Embedding(N, D, sparse=True).double()
    emb_dense = nn.Embedding(N, D).double()
    emb_dense.weight.data.copy_(emb_fused.weight.data)
    opt_fused = LazyAdam(emb_fused.parameters(), lr=0.01, weight_decay=0.001)
    opt_dense = torch.optim.Adam(emb_dense.parameters(), lr=0.01, weight_decay=0.001)
    for _ in range(4):
        ids = torch.cat([torch.randperm(N, generator=gen), torch.randint(0, N, (9,), generator=gen)]).view(-1, 3)
        target = torch.randn(ids.shape[0], 3, D, generator=gen, dtype=torch.float64)
        for emb, opt in ((emb_fused, opt_fused), (emb_dense, opt_dense)):
            opt.zero_grad()
            ((emb(ids) - target) ** 2).sum().backward()
            opt.step()
    assert emb_fused.weight.grad.is_sparse
    torch.testing.assert_close(emb_fused.weight, emb_dense.weight, rtol=1e-12, atol=1e-12)


def test_sparse_sgd_equals_torch_sgd():
    gen = torch.Generator().manual_seed(2)
    N, D = 50, 4
    w0 = torch.randn(N, D, generator=gen)
    p, q = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt, ref = SparseSGD([p], lr=0.3), torch.optim.SGD([q], lr=0.3)
    for idx, rows in _random_grads(N, D, 3, 70, gen, dtype=torch.float32):
        p.grad = _sparse_grad(N, D, idx, rows)
        q.grad = torch.zeros(N, D).index_add_(0, idx, rows)
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_rowwise_adagrad_matches_the_rowwise_rule():
    gen = torch.Generator().manual_seed(3)
    N, D = 15, 7
    w0 = torch.randn(N, D, generator=gen, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = RowWiseAdagrad([p], lr=0.1, eps=1e-8, initial_accumulator_value=0.5)
    w, acc = w0.clone(), torch.full((N,), 0.5, dtype=torch.float64)
    for idx, rows in _random_grads(N, D, 4, 12, gen):
        p.grad = _sparse_grad(N, D, idx, rows)
        opt.step()
        G = torch.zeros(N, D, dtype=torch.float64).index_add_(0, idx, rows)
        t = torch.zeros(N, dtype=torch.bool)
        t[idx] = True
        acc[t] += (G[t] ** 2).mean(1)
        w[t] -= 0.1 * G[t] / (acc[t].sqrt() + 1e-8)[:, None]
    torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["sum"], acc, rtol=1e-12, atol=1e-12)
    assert opt.state[p]["sum"].shape == (N,)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_coalesced_uncoalesced_and_dense_gradients_agree(kind):
    gen = torch.Generator().manual_seed(4)
    N, D = 20, 3
    w0 = torch.randn(N, D, generator=gen, dtype=torch.float64)
    grads = _random_grads(N, D, 3, 25, gen, high=12)
    results = []
    for form in ("uncoalesced", "coalesced", "dense"):
        p = nn.Parameter(w0.clone())
        opt = make_fused_optimizer(kind, [p], lr=0.05)
        expect_warning = pytest.warns(RuntimeWarning, match="dense gradient") if form == "dense" else nullcontext()
        with expect_warning:
            for idx, rows in grads:
                g = _sparse_grad(N, D, idx, rows)
                p.grad = g.coalesce() if form == "coalesced" else g.to_dense() if form == "dense" else g
                opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0], results[2], rtol=1e-12, atol=1e-12)
    assert torch.equal(results[0][12:], w0[12:])


def test_masked_embedding_sparse_gradient_is_consumed():
    ops = pytest.importorskip("optembed_ext.ops")
    gen = torch.Generator().manual_seed(5)
    N, D = 30, 8
    w0 = torch.randn(N, D, generator=gen)
    ids = torch.randint(0, 10, (16, 3), generator=gen)
    target = torch.randn(16, 3, D, generator=gen)
    out = {}
    for sparse in (True, False):
        p = nn.Parameter(w0.clone())
        opt = LazyAdam([p], lr=0.01) if sparse else torch.optim.Adam([p], lr=0.01)
        opt.zero_grad()
        loss = ((ops.masked_embedding(p, ids, sparse=sparse) - target) ** 2).sum()
        loss.backward()
        assert p.grad.is_sparse == sparse
        opt.step()
        out[sparse] = p.detach().clone()
    # first step: only touched rows move, and they move as dense Adam moves them (Adam's first step is lazy too)
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-6)
    assert torch.equal(out[True][10:], w0[10:])


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_one_dimensional_parameter_is_a_one_column_table(kind):
    gen = torch.Generator().manual_seed(9)
    N = 30
    w0 = torch.randn(N, generator=gen, dtype=torch.float64)
    grads = _random_grads(N, 1, 3, 20, gen, high=15)
    p1, p2 = nn.Parameter(w0.clone()), nn.Parameter(w0.clone().view(N, 1))
    o1, o2 = make_fused_optimizer(kind, [p1], lr=0.1), make_fused_optimizer(kind, [p2], lr=0.1)
    for idx, rows in grads:
        # element-sparse gradient of a 1-D parameter
        p1.grad = torch.sparse_coo_tensor(idx.view(1, -1), rows.view(-1), (N,), check_invariants=True)
        p2.grad = _sparse_grad(N, 1, idx, rows)
        o1.step()
        o2.step()
    assert p1.shape == (N,)
    torch.testing.assert_close(p1.detach(), p2.detach().view(N), rtol=1e-12, atol=1e-12)
    assert torch.equal(p1.detach()[15:], w0[15:])
    if kind == "adam":  # with one column the lazy rule is element-wise: check against the formula
        expected = _lazy_adam_reference(w0.view(N, 1), grads, 0.1, (0.9, 0.999), 1e-8, 0.0)
        torch.testing.assert_close(p1.detach(), expected.view(N), rtol=1e-12, atol=1e-12)


def test_compact_embedding_packed_storage():
    from optembed_ext.data import FeatureMap
    from optembed_ext.nn.compact import CompactEmbedding

    fm = FeatureMap("toy", ["a", "b"], [6, 4])
    emb = CompactEmbedding(fm, 4, field_rows=[6, 4], field_dims=[4, 2], sparse=True)
    with torch.no_grad():
        emb.packed.copy_(torch.randn(emb.packed.shape, generator=torch.Generator().manual_seed(10)))
    w0 = emb.packed.detach().clone()
    ids = torch.tensor([[0, 6], [2, 7], [0, 6]])
    emb.remap.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3], dtype=emb.remap.dtype))
    opt = LazyAdam(emb.sparse_parameters(), lr=0.01)
    (emb(ids) ** 2).sum().backward()
    assert emb.packed.grad.is_sparse
    g = emb.packed.grad.coalesce().to_dense()
    opt.step()
    # Adam's first step moves every entry with a non-zero gradient by lr * sign(g) (up to eps)
    moved = g != 0
    assert moved.sum() == 4 + 4 + 2 + 2  # two distinct rows of field a (D_a = 4), two of field b (D_b = 2)
    torch.testing.assert_close(emb.packed.detach()[moved], (w0 - 0.01 * g.sign())[moved], rtol=1e-5, atol=1e-6)
    assert torch.equal(emb.packed.detach()[~moved], w0[~moved])


# ------------------------------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_state_dict_round_trip_resumes_exactly(kind):
    gen = torch.Generator().manual_seed(6)
    N, D = 25, 4
    w0 = torch.randn(N, D, generator=gen)
    grads = _random_grads(N, D, 6, 20, gen, dtype=torch.float32)

    p_full = nn.Parameter(w0.clone())
    opt_full = make_fused_optimizer(kind, [p_full], lr=0.05, weight_decay=0.01)
    for idx, rows in grads:
        p_full.grad = _sparse_grad(N, D, idx, rows)
        opt_full.step()

    p = nn.Parameter(w0.clone())
    opt = make_fused_optimizer(kind, [p], lr=0.05, weight_decay=0.01)
    for idx, rows in grads[:3]:
        p.grad = _sparse_grad(N, D, idx, rows)
        opt.step()
    buf = io.BytesIO()
    torch.save({"w": p.detach().clone(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    p2 = nn.Parameter(saved["w"])
    opt2 = make_fused_optimizer(kind, [p2], lr=0.05, weight_decay=0.01)
    opt2.load_state_dict(saved["opt"])
    if kind != "sgd":
        assert opt2.state[p2]["step"] == 3
    for idx, rows in grads[3:]:
        p2.grad = _sparse_grad(N, D, idx, rows)
        opt2.step()
    assert torch.equal(p2.detach(), p_full.detach())


def test_load_state_dict_keeps_float32_state_for_half_tables():
    p = nn.Parameter(torch.randn(10, 4).half())
    opt = LazyAdam([p], lr=0.01)
    p.grad = _sparse_grad(10, 4, torch.tensor([1, 2, 2]), torch.randn(3, 4).half())
    opt.step()
    q = nn.Parameter(p.detach().clone())
    opt2 = LazyAdam([q], lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    q.grad = _sparse_grad(10, 4, torch.tensor([2]), torch.randn(1, 4).half())
    opt2.step()  # the kernel accepts the restored state


def test_load_state_dict_of_another_kind_raises():
    p = nn.Parameter(torch.randn(5, 2))
    sd = LazyAdam([p]).state_dict()
    with pytest.raises(ValueError, match="'adam'"):
        RowWiseAdagrad([p]).load_state_dict(sd)


# ------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, word", [
    ({"kind": "rmsprop"}, "kind"),
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"eps": 0.0}, "eps"),
    ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
    ({"betas": 0.9}, "betas"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"initial_accumulator_value": -1.0}, "initial_accumulator_value"),
])
def test_bad_hyper_parameters_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        FusedSparseOptimizer([nn.Parameter(torch.zeros(3, 2))], **kwargs)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="2-D"):
        LazyAdam([nn.Parameter(torch.zeros(3, 2, 2))])
    with pytest.raises(ValueError, match="contiguous"):
        LazyAdam([nn.Parameter(torch.zeros(3, 4).t())])
    with pytest.raises(ValueError, match=r"lr \(parameter group 1\)"):
        LazyAdam([{"params": [nn.Parameter(torch.zeros(3, 2))]},
                  {"params": [nn.Parameter(torch.zeros(3, 2))], "lr": -1.0}])
    p = nn.Parameter(torch.zeros(3, 2))
    opt = LazyAdam([p])
    with pytest.raises(ValueError, match="eps"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))], "eps": -1.0})
    assert len(opt.param_groups) == 1  # the bad group was not kept
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.tensor([1.0]), (3, 2),
                                     check_invariants=True)  # element-sparse
    with pytest.raises(ValueError, match="row-sparse"):
        opt.step()


def test_parameter_groups_use_their_own_lr():
    a, b = nn.Parameter(torch.zeros(4, 2)), nn.Parameter(torch.zeros(4, 2))
    opt = SparseSGD([{"params": [a], "lr": 1.0}, {"params": [b]}], lr=0.1)
    for p in (a, b):
        p.grad = _sparse_grad(4, 2, torch.tensor([1]), torch.ones(1, 2))
    opt.step()
    assert torch.equal(a.detach()[1], torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(b.detach()[1], torch.tensor([-0.1, -0.1]))
    assert torch.count_nonzero(a.detach()[[0, 2, 3]]) == 0


def test_works_with_lr_scheduler():
    p = nn.Parameter(torch.zeros(3, 1))
    opt = SparseSGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        p.grad = _sparse_grad(3, 1, torch.tensor([0]), torch.ones(1, 1))
        opt.step()
        sched.step()
    assert p.detach()[0, 0].item() == pytest.approx(-1.5)


# ---------------------------------------------------------------------------------------------------- trainer
def _tiny_setup(optimizer, run_dir=None, epochs=3, sparse=False, callbacks=()):
    from optembed_ext.data import make_synthetic
    from optembed_ext.models import build_model
    from optembed_ext.nn import UniformEmbedding
    from optembed_ext.train import TrainConfig, Trainer

    data = make_synthetic(num_samples=6000, num_fields=6, vocab_sizes=50, seed=0)
    torch.manual_seed(0)
    emb = UniformEmbedding(data.feature_map, 8, sparse=sparse)
    model = build_model("deepfm", data.feature_map, emb, mlp_dims=(32, 16))
    cfg = TrainConfig(epochs=epochs, batch_size=256, lr=3e-3, optimizer=optimizer, progress=False, patience=None,
                      seed=0)
    return Trainer(model, data, cfg, run_dir=run_dir, callbacks=callbacks), emb


def test_trainer_fused_adam_learns_the_synthetic_signal():
    from optembed_ext.train.trainer import OPTIMIZERS

    assert {"fused_sgd", "fused_adagrad", "fused_adam"} <= set(OPTIMIZERS)
    trainer, emb = _tiny_setup("fused_adam")
    assert emb.sparse_grad  # the trainer switched sparse table gradients on
    kinds = [type(o).__name__ for o in trainer.optimizer.optimizers]
    assert kinds == ["Adam", "LazyAdam"]
    table_opt = trainer.optimizer.optimizers[1]
    assert [p for g in table_opt.param_groups for p in g["params"]] == [emb.weight]
    dense_opt = trainer.optimizer.optimizers[0]
    assert all(p is not emb.weight for g in dense_opt.param_groups for p in g["params"])
    result = trainer.fit()
    assert result["test_auc"] > 0.65, result["test_auc"]


@pytest.mark.parametrize("name, cls", [("fused_sgd", "SparseSGD"), ("fused_adagrad", "RowWiseAdagrad")])
def test_trainer_builds_the_other_fused_optimizers(name, cls):
    trainer, emb = _tiny_setup(name, epochs=1)
    assert [type(o).__name__ for o in trainer.optimizer.optimizers] == ["Adam", cls]
    w0 = emb.weight.detach().clone()
    result = trainer.fit()
    assert math.isfinite(result["test_logloss"])
    assert not torch.equal(emb.weight.detach(), w0)


def test_trainer_fused_adam_resume_matches_an_uninterrupted_run(tmp_path):
    from optembed_ext.train import Callback

    class Crash(Callback):
        def __init__(self, armed):
            self.armed = armed

        def on_batch_begin(self, trainer, ids, labels):
            if self.armed and trainer.epoch == 1 and trainer.step_in_epoch == 0:
                raise KeyboardInterrupt

    full, emb_full = _tiny_setup("fused_adam", tmp_path / "full", epochs=2, callbacks=[Crash(False)])
    r_full = full.fit()
    first, _ = _tiny_setup("fused_adam", tmp_path / "split", epochs=2, callbacks=[Crash(True)])
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    second, emb_second = _tiny_setup("fused_adam", tmp_path / "split", epochs=2, callbacks=[Crash(False)])
    r_second = second.fit(resume=True)
    assert second.optimizer.optimizers[1].state[emb_second.weight]["step"] == r_full["global_step"]
    for a, b in zip(r_second["history"], r_full["history"]):
        assert a["train_loss"] == b["train_loss"]
        assert a["val_auc"] == b["val_auc"]
    assert torch.equal(emb_second.weight, emb_full.weight)


def test_trainer_keeps_dense_adam_for_a_module_without_sparse_gradients(caplog):
    from optembed_ext.data import make_synthetic
    from optembed_ext.models import build_model
    from optembed_ext.nn import EmbeddingModule
    from optembed_ext.train import TrainConfig, Trainer

    class DenseOnly(EmbeddingModule):  # no ``sparse`` switch
        def __init__(self, feature_map, embed_dim):
            super().__init__(feature_map, embed_dim)
            self.weight = nn.Parameter(torch.randn(self.num_features, embed_dim) * 0.01)

        def forward(self, ids):
            return self.weight[ids]

    data = make_synthetic(num_samples=600, num_fields=3, vocab_sizes=10, seed=0)
    emb = DenseOnly(data.feature_map, 4)
    model = build_model("fm", data.feature_map, emb)
    with caplog.at_level("WARNING", logger="optembed_ext.train.trainer"):
        trainer = Trainer(model, data, TrainConfig(epochs=1, optimizer="fused_adam", progress=False))
    assert not emb.sparse_grad
    assert [type(o).__name__ for o in trainer.optimizer.optimizers] == ["Adam"]
    assert "no sparse gradient" in caplog.text
