"""PEP: the soft-threshold embedding against its formula, sparsity vs threshold, budget masks, retraining."""
import math

import pytest
import torch

from optembed_ext.data import FeatureMap, make_synthetic
from optembed_ext.nn.pep import THRESHOLD_TYPES, PEPEmbedding, default_threshold_init
from optembed_ext.search.pep import PEPConfig, PEPPruningCallback, budget_mask, run_pep
from optembed_ext.train import TrainConfig

CARDS = [3, 5, 1, 7, 2]


def fmap(cards=CARDS):
    return FeatureMap("tiny", [f"f{i}" for i in range(len(cards))], list(cards))


def random_ids(fm, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, c, (batch,), generator=g) + o for c, o in zip(fm.cardinalities, fm.offsets)]
    return torch.stack(cols, dim=1)


def expected_threshold(kind, s, ids, D):
    """g(s) of every looked-up entry, (B, F, D), written position by position (no use of the module)."""
    B, F = ids.shape
    out = torch.empty(B, F, D, dtype=s.dtype)
    g = torch.sigmoid(s)
    for b in range(B):
        for f in range(F):
            r = int(ids[b, f])
            if kind == "global":
                out[b, f] = g[0]
            elif kind == "dimension":
                out[b, f] = g
            elif kind == "feature":
                out[b, f] = g[r, 0]
            elif kind == "feature_dim":
                out[b, f] = g[r]
            elif kind == "field":
                out[b, f] = g[f, 0]  # column f of ids holds ids of field f
            else:  # field_dim
                out[b, f] = g[f]
    return out


@pytest.mark.parametrize("kind", THRESHOLD_TYPES)
def test_forward_and_grad_match_formula(kind):
    torch.manual_seed(0)
    fm = fmap()
    D = 6
    emb = PEPEmbedding(fm, D, threshold_type=kind, threshold_init=-2.0)
    with torch.no_grad():
        emb.weight.normal_(0, 0.3)
        emb.s.uniform_(-4.0, 0.0)
    ids = random_ids(fm, 9)
    out = emb(ids)

    w = emb.weight.detach().clone().requires_grad_(True)
    s = emb.s.detach().clone().requires_grad_(True)
    v = w[ids]
    ref = torch.sign(v) * torch.relu(v.abs() - expected_threshold(kind, s, ids, D))
    torch.testing.assert_close(out, ref)
    assert (out == 0).any() and (out != 0).any()  # the case is not trivial

    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(emb.weight.grad, w.grad)
    torch.testing.assert_close(emb.s.grad, s.grad)


def test_retrain_forward_is_masked_table_and_lottery_init():
    torch.manual_seed(1)
    fm = fmap()
    n, D = fm.num_features, 4
    init = torch.randn(n, D)
    mask = torch.rand(n, D) > 0.5
    emb = PEPEmbedding(fm, D, mask=mask, init_weight=init)
    assert emb.retrain and not emb.s.requires_grad
    torch.testing.assert_close(emb.weight.detach(), init * mask)  # lottery ticket: initial values, masked
    ids = random_ids(fm, 11, seed=3)
    torch.testing.assert_close(emb(ids), (init * mask)[ids])
    assert emb.num_params() == int(((init * mask) != 0).sum())
    groups = emb.param_groups(1e-3, 1e-5)
    assert [p for g in groups for p in g["params"]] == [emb.weight]


def test_sparsity_grows_with_threshold():
    torch.manual_seed(2)
    fm = fmap([40, 30, 50])
    emb = PEPEmbedding(fm, 8, threshold_type="global")
    w = emb.weight.detach()
    values = []
    for s in [-12.0, -6.0, -4.5, -4.0, -3.5, -3.0, -2.0, -1.0, 0.0]:
        with torch.no_grad():
            emb.s.fill_(s)
        sp = emb.sparsity()
        expected = int((w.abs() <= torch.sigmoid(torch.tensor(s))).sum()) / w.numel()
        assert sp == pytest.approx(expected, abs=1e-9)
        values.append(sp)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[0] < 0.01 and values[-1] > 0.99


def test_param_groups_apply_weight_decay_to_threshold():
    emb = PEPEmbedding(fmap(), 4, threshold_lr=0.5)
    groups = emb.param_groups(1e-3, 1e-5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(emb.s)]["weight_decay"] == 1e-5 and by_param[id(emb.s)]["lr"] == 0.5
    assert by_param[id(emb.weight)]["lr"] == 1e-3


def test_official_defaults_and_bad_input():
    assert default_threshold_init("movielens100k") == -15.0
    assert default_threshold_init("criteo") == -150.0 and default_threshold_init("avazu") == -150.0
    cfg = PEPConfig()
    assert cfg.threshold_type == "feature_dim" and cfg.weight_decay == 1e-5
    with pytest.raises(ValueError, match="threshold_type"):
        PEPEmbedding(fmap(), 4, threshold_type="row")
    with pytest.raises(ValueError, match="mask"):
        PEPEmbedding(fmap(), 4, mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="target_sparsities"):
        PEPConfig(target_sparsities=[0.5, 1.5])


def test_budget_mask_keeps_exact_count_of_largest_margins():
    torch.manual_seed(3)
    fm = fmap([20, 10])
    emb = PEPEmbedding(fm, 5, threshold_type="feature", threshold_init=-3.0)
    with torch.no_grad():
        emb.s.uniform_(-5, -1)
    margin = emb.weight.detach().abs() - torch.sigmoid(emb.s.detach())  # (N,1) broadcast over D
    for t in (0.3, 0.55, 0.9):
        m = budget_mask(emb, t)
        k = round((1 - t) * m.numel())
        assert int(m.sum()) == k
        assert margin[m].min() >= margin[~m].max()


def test_pruning_saves_budgets_at_targets_and_retrains(tmp_path):
    data = make_synthetic(num_samples=3000, num_fields=5, vocab_sizes=[30, 20, 40, 10, 25],
                          informative_fields=[0, 2], seed=0)
    tc = TrainConfig(epochs=4, batch_size=128, lr=1e-3, progress=False, seed=0)
    targets = [0.3, 0.6]
    cfg = PEPConfig(threshold_type="feature_dim", threshold_init=-5.0, threshold_lr=0.05,
                    target_sparsities=targets, prune_epochs=20)
    res = run_pep(data, "fnn", 8, tc, cfg, model_cfg={"mlp_dims": [16]}, run_dir=tmp_path)
    total = data.feature_map.num_features * 8
    saved = res["search"]["saved"]
    assert sorted(saved) == ["0.3", "0.6"], res["search"]
    # the threshold's own sparsity crossed the targets, in order
    assert saved["0.3"]["step"] <= saved["0.6"]["step"]
    for t in targets:
        rec = torch.load(tmp_path / "prune" / "masks" / f"sparsity-{t:g}.pt")
        assert rec["threshold_sparsity"] >= t
        assert int(rec["mask"].sum()) == round((1 - t) * total)
    assert (tmp_path / "prune" / "initial_embedding.pt").exists()
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"sp0.3", "sp0.6"}
    for t in targets:
        r = rows[f"sp{t:g}"]
        assert r["num_params"] == round((1 - t) * total)
        assert r["sparsity"] == pytest.approx(t, abs=1.0 / total)
        assert math.isfinite(r["auc"]) and r["search_seconds"] > 0


def test_callback_final_mask_when_targets_unreachable(tmp_path):
    data = make_synthetic(num_samples=600, num_fields=3, vocab_sizes=10, seed=1)
    tc = TrainConfig(epochs=1, batch_size=128, progress=False, seed=0)
    cfg = PEPConfig(threshold_init=-15.0, target_sparsities=[0.9], prune_epochs=1)
    res = run_pep(data, "fm", 4, tc, cfg, run_dir=tmp_path)
    assert res["search"]["missing_targets"] == [0.9]
    assert [r["variant"].startswith("final") for r in res["rows"]] == [True]
    assert isinstance(PEPPruningCallback(PEPEmbedding(data.feature_map, 4), [0.5], tmp_path).state_dict(), dict)
