"""AutoField: gated supernet and field-selected table against their formulas, and dropping a planted noise field."""
import pytest
import torch

from optembed_ext.data import FeatureMap, make_synthetic
from optembed_ext.nn.autofield import AutoFieldEmbedding, FieldSelectedEmbedding
from optembed_ext.search.autofield import AutoFieldConfig, drop_fields, run_autofield, search_autofield
from optembed_ext.train import TrainConfig

CARDS = [3, 5, 1, 7, 2]


def fmap(cards=CARDS):
    return FeatureMap("tiny", [f"f{i}" for i in range(len(cards))], list(cards))


def random_ids(fm, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, c, (batch,), generator=g) + o for c, o in zip(fm.cardinalities, fm.offsets)]
    return torch.stack(cols, dim=1)


def test_gated_forward_matches_formula():
    torch.manual_seed(0)
    fm = fmap()
    emb = AutoFieldEmbedding(fm, 4, temperature=0.5)
    with torch.no_grad():
        emb.alpha.normal_()
    emb.eval()
    ids = random_ids(fm, 9)
    a = emb.alpha.detach()
    keep = torch.exp(a[:, 1] / 0.5) / (torch.exp(a[:, 0] / 0.5) + torch.exp(a[:, 1] / 0.5))
    ref = emb.weight.detach()[ids] * keep[None, :, None]
    torch.testing.assert_close(emb(ids), ref)
    emb.train()
    g = emb.gates()
    assert g.shape == (5,) and bool(((g >= 0) & (g <= 1)).all())


def test_select_top_fields():
    emb = AutoFieldEmbedding(fmap(), 4)
    with torch.no_grad():
        emb.alpha[:, 1] = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    assert emb.select(2) == [2, 4]
    assert emb.select(3) == [0, 2, 4]
    with pytest.raises(ValueError, match="num_fields"):
        emb.select(0)


def test_field_selected_embedding():
    torch.manual_seed(1)
    fm = fmap()
    emb = FieldSelectedEmbedding(fm, 3, keep=[3, 0])
    assert emb.keep == [0, 3] and emb.num_params() == (3 + 7) * 3
    ids = random_ids(fm, 8)
    out = emb(ids)
    W = emb.weight.detach()
    torch.testing.assert_close(out[:, 0], W[ids[:, 0]])                  # field 0: rows 0..2
    torch.testing.assert_close(out[:, 3], W[3 + ids[:, 3] - fm.offsets[3]])  # field 3 follows field 0
    assert (out[:, [1, 2, 4]] == 0).all()
    with pytest.raises(ValueError, match="keep"):
        FieldSelectedEmbedding(fm, 3, keep=[5])


def test_drop_fields_removes_information():
    data = make_synthetic(num_samples=300, num_fields=3, vocab_sizes=10, seed=0)
    sub = drop_fields(data, [0, 2])
    off = data.feature_map.offsets
    for name in ("train", "val", "test"):
        X, Y = getattr(data, name).X, getattr(sub, name).X
        assert (Y[:, 1] == off[1]).all()
        assert (Y[:, [0, 2]] == X[:, [0, 2]]).all()


def test_autofield_drops_planted_noise_fields():
    # fields 0 and 1 carry the planted signal, fields 2 and 3 are noise
    data = make_synthetic(num_samples=4000, num_fields=4, vocab_sizes=60, informative_fields=[0, 1], seed=1,
                          signal_scale=2.0)
    tc = TrainConfig(epochs=5, batch_size=256, lr=3e-3, progress=False, patience=None, seed=0)
    res = search_autofield(data, "fnn", 8, tc, AutoFieldConfig(keep=2, arch_lr=0.01),
                           model_cfg={"mlp_dims": [32]})
    assert res["keep"] == [0, 1], res
    p = res["keep_probabilities"]
    assert min(p[0], p[1]) > max(p[2], p[3])


def test_run_autofield_retrains_on_kept_fields(tmp_path):
    data = make_synthetic(num_samples=800, num_fields=4, vocab_sizes=[10, 20, 5, 8], seed=2)
    res = run_autofield(data, "deepfm", 4, TrainConfig(epochs=1, batch_size=200, progress=False),
                        AutoFieldConfig(keep=0.5), model_cfg={"mlp_dims": [8]}, run_dir=tmp_path)
    (row,) = res["rows"]
    keep = res["search"]["keep"]
    assert len(keep) == 2 and row["variant"] == "keep2"
    assert row["num_params"] == sum([10, 20, 5, 8][f] for f in keep) * 4


def test_retrain_variants_differ_only_in_first_order_ids(tmp_path, monkeypatch):
    import optembed_ext.search.autofield as af

    data = make_synthetic(num_samples=600, num_fields=3, vocab_sizes=[10, 20, 5], seed=3)
    seen = []
    real = af.train_and_evaluate

    def spy(d, *args, **kwargs):
        seen.append(d)
        return real(d, *args, **kwargs)

    monkeypatch.setattr(af, "train_and_evaluate", spy)
    tc = TrainConfig(epochs=1, batch_size=200, progress=False)
    res = run_autofield(data, "fm", 4, tc, AutoFieldConfig(keep=1, remove_fields=False))
    assert res["rows"][0]["variant"] == "keep1-emb"
    assert seen[-1] is data  # the retraining reads every field's ids (first-order terms)
    res = run_autofield(data, "fm", 4, tc, AutoFieldConfig(keep=1))
    dropped = [f for f in range(3) if f not in res["search"]["keep"]]
    assert all((seen[-1].train.X[:, f] == data.feature_map.offsets[f]).all() for f in dropped)
