"""OptEmbedEmbedding: forward semantics against a plain-PyTorch formula, frozen masks, optimiser groups, sizes."""
import math

import pytest
import torch

from optembed_ext.data import FeatureMap
from optembed_ext.nn.optembed import OptEmbedEmbedding


def _fmap(cards=(5, 3, 7, 4)):
    return FeatureMap("toy", [f"f{i}" for i in range(len(cards))], list(cards))


def _ids(fmap, batch, gen):
    cols = [torch.randint(0, c, (batch,), generator=gen) + o for c, o in zip(fmap.cardinalities, fmap.offsets)]
    return torch.stack(cols, 1)


def _formula(weight, ids, threshold, dims, p, fmap):
    """out[b,f,j] = 1[||w_r||_p > t_f] * w[r,j] * 1[j < k]: written from the paper, independent of the op."""
    D = weight.shape[1]
    w = weight[ids]
    out = w.clone()
    if threshold is not None:
        norm = w.abs().sum(-1) if p == 1 else w.pow(2).sum(-1).sqrt()
        out = out * (norm > threshold).unsqueeze(-1).to(w.dtype)
    if dims is not None:
        k = dims if dims.dim() == 2 else dims.expand(ids.shape[0], -1)
        out = out * (torch.arange(D) < k.unsqueeze(-1)).to(w.dtype)
    return out


@pytest.mark.parametrize("p", [1, 2])
def test_forward_matches_formula_with_threshold_and_dims(p):
    gen = torch.Generator().manual_seed(0)
    fmap = _fmap()
    emb = OptEmbedEmbedding(fmap, 6, norm=p)
    with torch.no_grad():
        emb.weight.normal_(generator=gen)
        emb.threshold.copy_(torch.tensor([0.5, 4.0, 2.0, 100.0]))  # last field fully pruned
    ids = _ids(fmap, 13, gen)
    emb.train()
    dims = torch.randint(1, 7, (13, 4), generator=gen)
    emb.set_dims(dims)
    torch.testing.assert_close(emb(ids), _formula(emb.weight.detach(), ids, emb.threshold.detach(), dims, p, fmap))
    # Per-sample dims only apply in training; evaluation uses the full dimension.
    emb.eval()
    torch.testing.assert_close(emb(ids), _formula(emb.weight.detach(), ids, emb.threshold.detach(), None, p, fmap))
    assert emb(ids)[:, 3].abs().sum() == 0


def test_threshold_gets_gradient_and_regulariser():
    fmap = _fmap()
    emb = OptEmbedEmbedding(fmap, 4, alpha=0.5)
    ids = _ids(fmap, 9, torch.Generator().manual_seed(1))
    emb(ids).sum().backward()
    assert emb.threshold.grad is not None and emb.threshold.grad.abs().sum() > 0
    expected = 0.5 * math.exp(-0.0) * fmap.num_fields
    assert emb.regularization().item() == pytest.approx(expected)


def test_param_groups_give_threshold_its_own_lr_without_decay():
    emb = OptEmbedEmbedding(_fmap(), 4, threshold_lr=0.02)
    groups = emb.param_groups(lr=1e-3, weight_decay=1e-5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(emb.weight)]["lr"] == 1e-3 and by_param[id(emb.weight)]["weight_decay"] == 1e-5
    assert by_param[id(emb.threshold)]["lr"] == 0.02 and by_param[id(emb.threshold)]["weight_decay"] == 0.0
    emb.freeze()
    assert all(id(emb.threshold) != id(p) for g in emb.param_groups(1e-3, 0.0) for p in g["params"])
    assert emb.regularization().item() == 0.0


def test_frozen_masks_zero_pruned_rows_and_block_their_gradient():
    gen = torch.Generator().manual_seed(2)
    fmap = _fmap()
    emb = OptEmbedEmbedding(fmap, 5)
    row_mask = torch.rand(fmap.num_features, generator=gen) > 0.4
    field_dims = [5, 2, 1, 3]
    emb.freeze(row_mask, field_dims)
    ids = _ids(fmap, 17, gen)
    out = emb(ids)
    w = emb.weight.detach()[ids] * row_mask[ids].unsqueeze(-1)
    w = w * (torch.arange(5) < torch.tensor(field_dims).unsqueeze(-1)).to(w.dtype)
    torch.testing.assert_close(out, w)
    out.pow(2).sum().backward()
    assert emb.weight.grad[~row_mask].abs().sum() == 0
    # num_params / bytes: kept rows x field dims, counted by hand
    kept = [int(row_mask[o:o + c].sum()) for o, c in zip(fmap.offsets, fmap.cardinalities)]
    assert emb.kept_rows_per_field() == kept
    assert emb.num_params() == sum(k * d for k, d in zip(kept, field_dims))
    assert emb.memory_bytes() == 4 * emb.num_params()
    assert emb.sparsity() == pytest.approx(1 - emb.num_params() / (fmap.num_features * 5))


def test_frozen_state_dict_round_trip():
    fmap = _fmap()
    a = OptEmbedEmbedding(fmap, 4)
    a.freeze(torch.arange(fmap.num_features) % 2 == 0, [1, 2, 3, 4])
    b = OptEmbedEmbedding(fmap, 4)
    b.load_state_dict(a.state_dict())
    assert b.frozen and b.field_dims() == [1, 2, 3, 4]
    ids = _ids(fmap, 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a(ids), b(ids))


def test_oov_mode_replaces_pruned_rows():
    fmap = _fmap()
    emb = OptEmbedEmbedding(fmap, 3, oov=True)
    with torch.no_grad():
        emb.threshold.fill_(1e6)  # everything pruned
    ids = _ids(fmap, 4, torch.Generator().manual_seed(4))
    expected = emb.oov_weight.detach().unsqueeze(0).expand(4, -1, -1)
    torch.testing.assert_close(emb(ids), expected)
    emb.freeze(torch.zeros(fmap.num_features, dtype=torch.bool))
    torch.testing.assert_close(emb(ids), expected)


def test_bad_arguments_raise_clear_errors():
    fmap = _fmap()
    with pytest.raises(ValueError, match="norm"):
        OptEmbedEmbedding(fmap, 4, norm=3)
    emb = OptEmbedEmbedding(fmap, 4)
    with pytest.raises(ValueError, match="dims"):
        emb.set_dims([0, 1, 2, 3])
    with pytest.raises(ValueError, match="dims"):
        emb.set_dims([1, 2])
    with pytest.raises(ValueError, match="row_mask"):
        emb.freeze(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="field_dims"):
        emb.freeze(None, [1, 2, 3, 9])


def _ste(x):
    """Long-tail straight-through derivative of the unit step (OptEmbed): 2 - 4|x| near 0, 0.4 in the tail."""
    a = x.abs()
    return torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1.0, torch.full_like(x, 0.4), torch.zeros_like(x)))


@pytest.mark.parametrize("p", [1, 2])
def test_supernet_gradients_match_the_straight_through_formula(p):
    """Gradients of the table and the thresholds written from the formula with plain tensor ops."""
    gen = torch.Generator().manual_seed(5)
    fmap = _fmap()
    D = 6
    emb = OptEmbedEmbedding(fmap, D, norm=p).double()
    with torch.no_grad():
        emb.weight.normal_(0, 0.3, generator=gen)
        emb.threshold.copy_(torch.tensor([0.8, 0.5, 1.1, 0.9], dtype=torch.float64))
    ids = _ids(fmap, 11, gen)
    ids[3] = ids[0]  # repeated rows accumulate
    dims = torch.randint(1, D + 1, (11, 4), generator=gen)
    emb.train()
    emb.set_dims(dims)
    g = torch.randn(11, 4, D, generator=gen, dtype=torch.float64)
    (emb(ids) * g).sum().backward()

    w = emb.weight.detach()
    rows = w[ids]                                                   # (B, F, D)
    n = rows.abs().sum(-1) if p == 1 else rows.pow(2).sum(-1).sqrt()
    x = n - emb.threshold.detach()
    m = (x > 0).double()
    keep = (torch.arange(D) < dims.unsqueeze(-1)).double()
    s = (g * keep * rows).sum(-1)                                    # (B, F)
    dn = rows.sign() if p == 1 else rows / n.unsqueeze(-1)
    per_pos = m.unsqueeze(-1) * g * keep + (s * _ste(x)).unsqueeze(-1) * dn
    grad_w = torch.zeros_like(w).index_add_(0, ids.flatten(), per_pos.reshape(-1, D))
    grad_t = -(s * _ste(x)).sum(0)
    torch.testing.assert_close(emb.weight.grad, grad_w)
    torch.testing.assert_close(emb.threshold.grad, grad_t)


# ------------------------------------------------------------------------------------------- sparse gradients
@pytest.mark.parametrize("frozen", [False, True])
def test_sparse_gradient_is_coo_and_equals_the_dense_gradient(frozen):
    gen = torch.Generator().manual_seed(5)
    fmap = _fmap()
    dense = OptEmbedEmbedding(fmap, 6, oov=True)
    sparse = OptEmbedEmbedding(fmap, 6, oov=True, sparse=True)
    assert sparse.sparse_grad and not dense.sparse_grad
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():
        dense.threshold.fill_(0.3)
        sparse.threshold.fill_(0.3)
    ids = _ids(fmap, 23, gen)  # repeated ids: their gradient rows must be summed
    if frozen:
        row_mask = torch.rand(fmap.num_features, generator=gen) > 0.3
        for e in (dense, sparse):
            e.freeze(row_mask, [6, 2, 1, 4])
    else:
        dims = torch.randint(1, 7, (23, fmap.num_fields), generator=gen)
        for e in (dense, sparse):
            e.set_dims(dims)
    g = torch.randn(23, fmap.num_fields, 6, generator=gen)
    (dense(ids) * g).sum().backward()
    (sparse(ids) * g).sum().backward()
    assert sparse.weight.grad.layout == torch.sparse_coo and dense.weight.grad.layout == torch.strided
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    assert sparse.weight.grad.coalesce().indices().unique().numel() <= ids.unique().numel()
    torch.testing.assert_close(sparse.oov_weight.grad, dense.oov_weight.grad)
    if not frozen:
        torch.testing.assert_close(sparse.threshold.grad, dense.threshold.grad)
    assert sparse.sparse_parameters() == [sparse.weight]


def test_fused_adam_trains_the_table_with_row_sparse_updates(tmp_path):
    from optembed_ext.data import make_synthetic
    from optembed_ext.models import build_model
    from optembed_ext.train.callbacks import Callback
    from optembed_ext.train.config import TrainConfig
    from optembed_ext.train.trainer import Trainer

    data = make_synthetic(num_samples=4000, num_fields=4, vocab_sizes=[30, 300, 30, 300], seed=3)
    torch.manual_seed(0)
    emb = OptEmbedEmbedding(data.feature_map, 8, threshold_lr=1e-2)  # sparse=False: the trainer switches it on
    model = build_model("fm", data.feature_map, emb)
    seen_rows = []

    class Spy(Callback):  # the table's gradient in every step: sparse COO, rows of the looked-up ids only
        def on_after_backward(self, trainer):
            grad = emb.weight.grad
            assert grad is not None and grad.layout == torch.sparse_coo
            seen_rows.append(grad.coalesce().indices().numel())

    cfg = TrainConfig(epochs=3, batch_size=256, lr=1e-2, optimizer="fused_adam", patience=None, progress=False)
    before = emb.weight.detach().clone()
    result = Trainer(model, data, cfg, run_dir=tmp_path, callbacks=[Spy()]).fit()
    assert emb.sparse_grad and seen_rows and max(seen_rows) <= 256 * data.feature_map.num_fields
    never_seen = torch.ones(data.feature_map.num_features, dtype=torch.bool)
    never_seen[torch.as_tensor(data.train.X).flatten()] = False
    assert never_seen.any()
    # rows never looked up in training keep their initial values (lazy, row-sparse updates)
    torch.testing.assert_close(emb.weight.detach()[never_seen], before[never_seen])
    assert result["test_auc"] > 0.6


def test_package_exports_every_embedding_module():
    import importlib

    import optembed_ext.nn as nn_pkg
    from optembed_ext.nn.base import EmbeddingModule

    modules = {"UniformEmbedding": "uniform", "OptEmbedEmbedding": "optembed", "CompactEmbedding": "compact",
               "PEPEmbedding": "pep", "AutoDimEmbedding": "autodim", "MixedDimEmbedding": "autodim",
               "QREmbedding": "qr", "AutoFieldEmbedding": "autofield", "FieldSelectedEmbedding": "autofield"}
    helpers = {"CombinedOptimizer", "SupernetHook", "describe", "embedding_modules", "make_optimizer", "make_table",
               "regularization", "sparsity", "to_compact"}
    assert set(nn_pkg.__all__) == set(modules) | {"EmbeddingModule"} | helpers
    for name, mod in modules.items():
        cls = getattr(nn_pkg, name)
        assert cls is getattr(importlib.import_module(f"optembed_ext.nn.{mod}"), name)
        assert issubclass(cls, EmbeddingModule)


# ------------------------------------------------------------------------------ per-feature thresholds
def _feature_formula(weight, ids, thr_rows, dims, p, oov, field_of_lookup):
    """out[b,f,j] = (m w[r,j] + (1-m) oov[f,j]) 1[j < k], m = 1[||w_r||_p > t_r]: the per-row rule in plain ops."""
    D = weight.shape[1]
    w = weight[ids]
    norm = w.abs().sum(-1) if p == 1 else w.pow(2).sum(-1).sqrt()
    m = (norm > thr_rows[ids]).to(w.dtype).unsqueeze(-1)
    out = m * w
    if oov is not None:
        out = out + (1 - m) * oov[field_of_lookup]
    if dims is not None:
        k = dims if dims.dim() == 2 else dims.expand(ids.shape[0], -1)
        out = out * (torch.arange(D) < k.unsqueeze(-1)).to(w.dtype)
    return out


def _feature_emb(fmap, D, p=1, oov=False, dtype=torch.float64, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    emb = OptEmbedEmbedding(fmap, D, norm=p, oov=oov, threshold_mode="feature", **kw).to(dtype)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(emb.weight.shape, generator=gen, dtype=torch.float64) * 0.3)
        # thresholds near the row norms: every case of the long-tail STE (|x| <= 0.4, <= 1, > 1) occurs
        norms = emb.weight.detach().double().norm(p=p, dim=1)
        emb.threshold.copy_(norms + torch.empty_like(norms).uniform_(-2.0, 2.0, generator=gen))
        if oov:
            emb.oov_weight.copy_(torch.randn(emb.oov_weight.shape, generator=gen, dtype=torch.float64))
    return emb


def test_feature_mode_has_one_threshold_per_row_and_rejects_bad_modes():
    fmap = _fmap()
    emb = OptEmbedEmbedding(fmap, 4, threshold_mode="feature", alpha=0.5, threshold_init=0.2)
    assert emb.threshold.shape == (fmap.num_features,) and emb.threshold_mode == "feature"
    assert OptEmbedEmbedding(fmap, 4).threshold.shape == (fmap.num_fields,)
    # the regulariser sums over every row threshold
    assert emb.regularization().item() == pytest.approx(0.5 * fmap.num_features * math.exp(-0.2))
    emb.regularization().backward()
    torch.testing.assert_close(emb.threshold.grad, torch.full((fmap.num_features,), -0.5 * math.exp(-0.2)))
    with pytest.raises(ValueError, match="threshold_mode"):
        OptEmbedEmbedding(fmap, 4, threshold_mode="row")
    from optembed_ext.search.optembed import OptEmbedConfig

    with pytest.raises(ValueError, match="threshold_mode"):
        OptEmbedConfig(threshold_mode="row")


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("oov", [False, True])
def test_feature_mode_forward_matches_the_per_row_formula(p, oov):
    fmap = _fmap()
    emb = _feature_emb(fmap, 6, p=p, oov=oov)
    gen = torch.Generator().manual_seed(1)
    ids = _ids(fmap, 17, gen)
    fol = torch.arange(fmap.num_fields).expand(17, -1)
    w, t = emb.weight.detach(), emb.threshold.detach()
    oov_w = emb.oov_weight.detach() if oov else None
    dims = torch.randint(1, 7, (17, 4), generator=gen)
    emb.train()
    emb.set_dims(dims)
    torch.testing.assert_close(emb(ids), _feature_formula(w, ids, t, dims, p, oov_w, fol))
    emb.eval()
    expected = _feature_formula(w, ids, t, None, p, oov_w, fol)
    torch.testing.assert_close(emb(ids), expected)
    # two rows of one field with different thresholds: the per-row rule, not a per-field one, decides
    kept = emb.row_mask()
    norms = w.norm(p=p, dim=1)
    assert torch.equal(kept, norms > t)
    assert 0 < int(kept.sum()) < fmap.num_features
    # field dims after freezing; the empty batch
    emb.set_dims(torch.tensor([6, 2, 1, 4]))
    torch.testing.assert_close(emb(ids), _feature_formula(w, ids, t, torch.tensor([6, 2, 1, 4]), p, oov_w, fol))
    assert emb(ids[:0]).shape == (0, 4, 6)


def _ste(x):
    ax = x.abs()
    return torch.where(ax <= 0.4, 2 - 4 * ax, torch.where(ax <= 1, torch.full_like(x, 0.4), torch.zeros_like(x)))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("oov", [False, True])
def test_feature_mode_gradients_match_the_straight_through_formula(p, oov):
    """Gradients of the table, the row thresholds and the OOV vectors written from the formula."""
    fmap = _fmap()
    D, B = 6, 19
    emb = _feature_emb(fmap, D, p=p, oov=oov, seed=3)
    gen = torch.Generator().manual_seed(4)
    ids = _ids(fmap, B, gen)
    ids[5] = ids[0]
    ids[7] = ids[0]  # repeated rows accumulate
    dims = torch.randint(1, D + 1, (B, 4), generator=gen)
    emb.train()
    emb.set_dims(dims)
    g = torch.randn(B, 4, D, generator=gen, dtype=torch.float64)
    (emb(ids) * g).sum().backward()

    w, t = emb.weight.detach(), emb.threshold.detach()
    rows = w[ids]
    n = rows.abs().sum(-1) if p == 1 else rows.pow(2).sum(-1).sqrt()
    x = n - t[ids]
    m = (x > 0).double()
    keep = (torch.arange(D) < dims.unsqueeze(-1)).double()
    o = emb.oov_weight.detach().unsqueeze(0).expand(B, -1, -1) if oov else torch.zeros_like(rows)
    s = (g * keep * (rows - o)).sum(-1)                              # d out / d m, (B, F)
    dn = rows.sign() if p == 1 else rows / n.unsqueeze(-1)
    per_pos = m.unsqueeze(-1) * g * keep + (s * _ste(x)).unsqueeze(-1) * dn
    grad_w = torch.zeros_like(w).index_add_(0, ids.flatten(), per_pos.reshape(-1, D))
    grad_t = torch.zeros_like(t).index_add_(0, ids.flatten(), -(s * _ste(x)).flatten())
    assert (_ste(x) == 0).any() and ((_ste(x) > 0) & (_ste(x) < 0.5)).any() and (_ste(x) > 0.5).any()
    torch.testing.assert_close(emb.weight.grad, grad_w)
    torch.testing.assert_close(emb.threshold.grad, grad_t)
    assert emb.threshold.grad[torch.isin(torch.arange(fmap.num_features), ids.unique(), invert=True)].eq(0).all()
    if oov:
        grad_oov = ((1 - m).unsqueeze(-1) * g * keep).sum(0)
        torch.testing.assert_close(emb.oov_weight.grad, grad_oov)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_feature_mode_low_precision_follows_float64(dtype):
    fmap = _fmap()
    ref = _feature_emb(fmap, 8, seed=6)
    emb = _feature_emb(fmap, 8, seed=6, dtype=dtype)
    with torch.no_grad():  # the same rows and thresholds, rounded to the dtype
        ref.weight.copy_(emb.weight.double())
        ref.threshold.copy_(emb.threshold.double())
    ids = _ids(fmap, 9, torch.Generator().manual_seed(7))
    out = emb.eval()(ids)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref.eval()(ids), rtol=0, atol=0)  # a copy or zeros: exact


def test_feature_mode_sparse_gradient_equals_dense_and_sgd_steps_row_thresholds():
    fmap = _fmap()
    dense = _feature_emb(fmap, 6, oov=True, dtype=torch.float32, seed=8)
    sparse = _feature_emb(fmap, 6, oov=True, dtype=torch.float32, seed=8, sparse=True)
    ids = _ids(fmap, 23, torch.Generator().manual_seed(9))
    g = torch.randn(23, 4, 6, generator=torch.Generator().manual_seed(10))
    for e in (dense, sparse):
        e.train()
        (e(ids) * g).sum().backward()
    assert sparse.weight.grad.layout == torch.sparse_coo
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    torch.testing.assert_close(sparse.threshold.grad, dense.threshold.grad)
    torch.testing.assert_close(sparse.oov_weight.grad, dense.oov_weight.grad)
    # the trainer's threshold optimizer (plain SGD) moves every row threshold by exactly lr * grad
    from optembed_ext.train.optimizers import make_threshold_optimizer

    opt = make_threshold_optimizer([dense.threshold], "sgd", 0.25)
    before, grad = dense.threshold.detach().clone(), dense.threshold.grad.clone()
    assert grad.abs().sum() > 0
    opt.step()
    torch.testing.assert_close(dense.threshold.detach(), before - 0.25 * grad, rtol=0, atol=1e-7)


def test_feature_mode_freezes_exports_and_reloads_by_the_threshold_shape():
    fmap = _fmap()
    emb = _feature_emb(fmap, 6, dtype=torch.float32, seed=11).eval()
    ids = _ids(fmap, 15, torch.Generator().manual_seed(12))
    # the compact table serves the supernet's eval output: kept rows by their own thresholds
    compact = emb.to_compact()
    torch.testing.assert_close(compact(ids), emb(ids))
    assert 0 < sum(emb.kept_rows_per_field()) < fmap.num_features
    mask = emb.row_mask()
    emb.freeze(mask, [6, 3, 2, 5])
    frozen_out = emb(ids)
    torch.testing.assert_close(emb.to_compact()(ids), frozen_out)
    # a model built with the default (per-field) mode adopts the per-row thresholds of a saved state dict
    other = OptEmbedEmbedding(fmap, 6).eval()
    other.freeze(mask, [6, 3, 2, 5])
    other.load_state_dict(emb.state_dict())
    assert other.threshold_mode == "feature" and other.threshold.shape == (fmap.num_features,)
    torch.testing.assert_close(other(ids), frozen_out)
    back = OptEmbedEmbedding(fmap, 6, threshold_mode="feature")
    back.load_state_dict(OptEmbedEmbedding(fmap, 6).state_dict())
    assert back.threshold_mode == "field" and back.threshold.shape == (fmap.num_fields,)


@pytest.mark.parametrize("training", [True, False])
def test_feature_mode_compiles_fullgraph_and_exports(training):
    fmap = _fmap()
    emb = OptEmbedEmbedding(fmap, 8, threshold_mode="feature", sample_dims=True, oov=True).train(training)
    with torch.no_grad():
        emb.threshold.copy_(emb.weight.detach().norm(p=1, dim=1) + torch.linspace(-0.5, 0.5, fmap.num_features))
    ids = _ids(fmap, 6, torch.Generator().manual_seed(13))
    torch._dynamo.reset()
    compiled = torch.compile(emb, fullgraph=True, backend="aot_eager")
    out = compiled(ids)
    assert out.shape == (6, 4, 8)
    if training:
        out.sum().backward()
        assert emb.threshold.grad is not None and emb.weight.grad is not None
    else:
        torch.testing.assert_close(out, emb(ids))
        exported = torch.export.export(emb, (ids,))
        torch.testing.assert_close(exported.module()(ids), emb(ids))
