"""AutoDim: supernet and mixed-dimension modules against their formulas, temperature schedule, DARTS steps,
and the search on planted data."""
import pytest
import torch

from optembed_ext.data import FeatureMap, make_synthetic
from optembed_ext.models import build_model
from optembed_ext.nn.autodim import AutoDimEmbedding, MixedDimEmbedding
from optembed_ext.search.autodim import (AutoDimConfig, DartsArchitectureCallback, run_autodim, search_autodim,
                                         temperature_at)
from optembed_ext.train import Trainer, TrainConfig

CARDS = [3, 5, 1, 7, 2]


def fmap(cards=CARDS):
    return FeatureMap("tiny", [f"f{i}" for i in range(len(cards))], list(cards))


def random_ids(fm, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, c, (batch,), generator=g) + o for c, o in zip(fm.cardinalities, fm.offsets)]
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("transform", ["linear", "zero_pad"])
def test_supernet_eval_forward_matches_formula(transform):
    torch.manual_seed(0)
    fm = fmap()
    D, cands = 8, [2, 4, 8]
    emb = AutoDimEmbedding(fm, D, candidates=cands, transform=transform, batch_norm=False, temperature=0.7)
    with torch.no_grad():
        emb.alpha.normal_()
    emb.eval()
    ids = random_ids(fm, 13)
    W = emb.weight.detach()
    p = torch.softmax(emb.alpha.detach() / 0.7, dim=-1)
    ref = torch.zeros(13, fm.num_fields, D)
    for b in range(13):
        for f in range(fm.num_fields):
            e = W[ids[b, f]]
            for k, dk in enumerate(cands):
                if transform == "linear":
                    t = e[:dk] @ emb.proj_weight[k][f].detach() + emb.proj_bias[k][f].detach()
                else:
                    t = torch.cat([e[:dk], torch.zeros(D - dk)])
                ref[b, f] += p[f, k] * t
    torch.testing.assert_close(emb(ids), ref)


def test_supernet_batch_norm_and_training_mixture():
    torch.manual_seed(1)
    fm = fmap()
    emb = AutoDimEmbedding(fm, 4, candidates=[2, 4], transform="zero_pad", batch_norm=True)
    ids = random_ids(fm, 64)
    emb.eval()  # fresh running statistics: mean 0, var 1 -> x / sqrt(1 + eps)
    W = emb.weight.detach()
    p = torch.softmax(emb.alpha.detach(), dim=-1)
    e = W[ids]
    c2 = torch.nn.functional.pad(e[..., :2], (0, 2))
    scale = (2.0 / (fm.num_features + 4)) ** 0.5  # the table's xavier std
    ref = (p[None, :, 0, None] * c2 + p[None, :, 1, None] * e) / (1 + 1e-5) ** 0.5 * scale
    torch.testing.assert_close(emb(ids), ref)
    emb.train()
    w = emb.selection_weights()
    assert w.shape == (fm.num_fields, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(fm.num_fields))


def test_mixed_dim_forward_matches_formula():
    torch.manual_seed(2)
    fm = fmap()
    dims = [2, 8, 1, 4, 3]
    emb = MixedDimEmbedding(fm, 8, dims)
    ids = random_ids(fm, 10)
    off = fm.offsets
    for f, d in enumerate(dims):
        ref = emb.tables[f].detach()[ids[:, f] - off[f]] @ emb.proj_weight[f].detach() + emb.proj_bias[f].detach()
        torch.testing.assert_close(emb(ids)[:, f], ref)
    assert emb.num_params() == sum(c * d for c, d in zip(CARDS, dims))
    zp = MixedDimEmbedding(fm, 8, dims, transform="zero_pad")
    out = zp(ids)
    for f, d in enumerate(dims):
        torch.testing.assert_close(out[:, f, :d], zp.tables[f].detach()[ids[:, f] - off[f]])
        assert (out[:, f, d:] == 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="candidates"):
        AutoDimEmbedding(fmap(), 8, candidates=[2, 16], transform="zero_pad")
    with pytest.raises(ValueError, match="transform"):
        AutoDimEmbedding(fmap(), 8, transform="pad")
    with pytest.raises(ValueError, match="dims"):
        MixedDimEmbedding(fmap(), 8, [2, 2])
    with pytest.raises(ValueError, match="arch_every"):
        DartsArchitectureCallback(AutoDimEmbedding(fmap(), 8, candidates=[2, 8]), arch_every=0)


def test_temperature_schedule():
    assert temperature_at(0) == 1.0
    assert temperature_at(10000) == pytest.approx(0.5)
    assert temperature_at(19800) == pytest.approx(0.01)
    assert temperature_at(10 ** 6) == 0.01


@pytest.mark.parametrize("second_order", [False, True])
def test_darts_callback_moves_only_arch_weights_on_val_batches(second_order):
    data = make_synthetic(num_samples=800, num_fields=3, vocab_sizes=10, seed=0)
    emb = AutoDimEmbedding(data.feature_map, 8, candidates=[2, 8])
    model = build_model("fnn", data.feature_map, emb, mlp_dims=[8])
    cb = DartsArchitectureCallback(emb, arch_lr=0.05, second_order=second_order)
    trainer = Trainer(model, data, TrainConfig(epochs=1, batch_size=100, progress=False), callbacks=[cb])
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(emb.alpha) not in opt_ids
    before = emb.alpha.detach().clone()
    trainer.fit()
    assert cb.arch_steps == trainer.global_step == -(-len(data.train) // 100)
    assert not torch.equal(before, emb.alpha.detach())
    assert emb.temperature == pytest.approx(temperature_at(trainer.global_step))


def test_autodim_prefers_larger_dim_for_planted_signal_field():
    # field 0 carries the planted signal, fields 1-3 are noise; FNN reads the fields only through embeddings
    cands = torch.tensor([2.0, 8.0, 16.0])
    for seed in (0, 1):
        data = make_synthetic(num_samples=6000, num_fields=4, vocab_sizes=100, informative_fields=[0], seed=seed,
                              signal_scale=2.0, useful_fraction=0.5)
        tc = TrainConfig(epochs=8, batch_size=256, lr=3e-3, progress=False, patience=None, seed=seed)
        res = search_autodim(data, "fnn", 16, tc, AutoDimConfig(candidates=[2, 8, 16], transform="zero_pad",
                                                                batch_norm=False, arch_lr=0.03),
                             model_cfg={"mlp_dims": [32]})
        dims = res["dims"]
        assert dims[0] > min(dims[1:]), res
        expected_dim = (torch.tensor(res["probabilities"]) * cands).sum(-1)
        assert expected_dim[0] > expected_dim[1:].max(), res


def test_run_autodim_retrains_with_chosen_dims(tmp_path):
    data = make_synthetic(num_samples=1000, num_fields=3, vocab_sizes=[10, 20, 5], seed=3)
    tc = TrainConfig(epochs=1, batch_size=200, progress=False)
    res = run_autodim(data, "deepfm", 8, tc, AutoDimConfig(candidates=[2, 4, 8]), model_cfg={"mlp_dims": [8]},
                      run_dir=tmp_path)
    (row,) = res["rows"]
    dims = res["search"]["dims"]
    assert row["num_params"] == sum(c * d for c, d in zip([10, 20, 5], dims))
    assert (tmp_path / "search" / "metrics.json").exists() and (tmp_path / "retrain" / "metrics.json").exists()


@pytest.mark.parametrize("transform", ["linear", "zero_pad"])
def test_separate_embeddings_variant_matches_formula(transform):
    """weight_sharing=False (the paper's separate embeddings): candidate k reads its own (N, d_k) table."""
    torch.manual_seed(1)
    fm = fmap()
    D, cands = 8, [2, 4, 8]
    emb = AutoDimEmbedding(fm, D, candidates=cands, transform=transform, batch_norm=False, weight_sharing=False)
    assert [tuple(t.shape) for t in emb.small_tables] == [(fm.num_features, 2), (fm.num_features, 4)]
    assert emb.num_params() == fm.num_features * sum(cands)
    with torch.no_grad():
        emb.alpha.normal_()
    emb.eval()
    ids = random_ids(fm, 11, seed=2)
    tables = [emb.small_tables[0].detach(), emb.small_tables[1].detach(), emb.weight.detach()]
    p = torch.softmax(emb.alpha.detach(), dim=-1)
    ref = torch.zeros(11, fm.num_fields, D)
    for b in range(11):
        for f in range(fm.num_fields):
            for k, dk in enumerate(cands):
                e = tables[k][ids[b, f]]
                if transform == "linear":
                    t = e @ emb.proj_weight[k][f].detach() + emb.proj_bias[k][f].detach()
                else:
                    t = torch.cat([e, torch.zeros(D - dk)])
                ref[b, f] += p[f, k] * t
    torch.testing.assert_close(emb(ids), ref)
    # every table is trained (all but alpha are in the trainer's groups) and gets a gradient
    emb.train()
    emb(ids).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in [*emb.small_tables, emb.weight])
    assert {id(p) for g in emb.param_groups(1e-3, 0.0) for p in g["params"]} >= {id(t) for t in emb.small_tables}


def test_run_autodim_with_separate_embeddings(tmp_path):
    data = make_synthetic(num_samples=800, num_fields=3, vocab_sizes=[10, 20, 5], seed=3)
    tc = TrainConfig(epochs=1, batch_size=200, progress=False)
    cfg = AutoDimConfig(candidates=[2, 4, 8], weight_sharing=False)
    res = run_autodim(data, "fm", 8, tc, cfg, run_dir=tmp_path)
    (row,) = res["rows"]
    assert set(res["search"]["dims"]) <= {2, 4, 8} and row["num_params"] > 0
