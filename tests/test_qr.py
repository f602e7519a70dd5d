"""Quotient-remainder embeddings: table sizes as configured, forward against the formula, uniqueness."""
import pytest
import torch

from optembed_ext.data import FeatureMap, make_synthetic
from optembed_ext.nn.qr import QREmbedding, resolve_collisions
from optembed_ext.search.qr import QRConfig, run_qr
from optembed_ext.train import TrainConfig

CARDS = [10, 7, 1, 33, 4]


def fmap(cards=CARDS):
    return FeatureMap("tiny", [f"f{i}" for i in range(len(cards))], list(cards))


def all_ids(fm):
    """Every feature of every field once (fields padded by repeating their last id)."""
    n = max(fm.cardinalities)
    cols = [torch.clamp(torch.arange(n), max=c - 1) + o for c, o in zip(fm.cardinalities, fm.offsets)]
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_table_shapes_as_configured(operation):
    fm = fmap()
    D = 6
    emb = QREmbedding(fm, D, collisions=[3, 2, 5, 4, 1], operation=operation)
    dq, dr = (3, 3) if operation == "concat" else (D, D)
    shapes = emb.table_shapes()
    assert shapes[0] == {"quotient": (4, dq), "remainder": (3, dr)}     # ceil(10 / 3) = 4
    assert shapes[1] == {"quotient": (4, dq), "remainder": (2, dr)}     # ceil(7 / 2) = 4
    assert shapes[2] == {"quotient": (1, D), "remainder": None}         # c capped at cardinality 1 -> full
    assert shapes[3] == {"quotient": (9, dq), "remainder": (4, dr)}     # ceil(33 / 4) = 9
    assert shapes[4] == {"quotient": (4, D), "remainder": None}         # c = 1 -> full table
    assert emb.num_params() == (4 + 4 + 9) * dq + (3 + 2 + 4) * dr + (1 + 4) * D
    assert emb.sparsity() == pytest.approx(1 - emb.num_params() / (sum(CARDS) * D))


def test_collisions_by_name_and_min_cardinality():
    fm = fmap()
    assert resolve_collisions(fm, 4) == [4] * 5
    assert resolve_collisions(fm, {"f3": 8}) == [1, 1, 1, 8, 1]
    emb = QREmbedding(fm, 4, collisions=3, min_cardinality=7)
    assert emb.collisions == [3, 1, 1, 3, 1]
    with pytest.raises(ValueError, match="collisions"):
        resolve_collisions(fm, {"nope": 2})
    with pytest.raises(ValueError, match="collisions"):
        resolve_collisions(fm, [2, 2])
    with pytest.raises(ValueError, match="operation"):
        QREmbedding(fm, 4, operation="max")


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_forward_matches_formula_and_is_unique(operation):
    torch.manual_seed(0)
    fm = fmap()
    cs = [3, 2, 5, 4, 1]
    emb = QREmbedding(fm, 6, collisions=cs, operation=operation)
    ids = all_ids(fm)
    out = emb(ids)
    for f, c in enumerate(cs):
        c = min(c, fm.cardinalities[f])
        i = ids[:, f] - fm.offsets[f]
        Q = emb.quotient[f].detach()
        if c == 1:
            ref = Q[i]
        else:
            q, r = Q[i // c], emb.remainder[f].detach()[i % c]
            ref = {"mult": q * r, "add": q + r, "concat": torch.cat([q, r], -1)}[operation]
        torch.testing.assert_close(out[:, f], ref)
        # complementary partitions: distinct features of a field get distinct embeddings
        distinct = out[: fm.cardinalities[f], f]
        assert torch.unique(distinct, dim=0).shape[0] == fm.cardinalities[f]


def test_run_qr_one_model_per_collision_count(tmp_path):
    data = make_synthetic(num_samples=800, num_fields=3, vocab_sizes=[12, 30, 5], seed=0)
    res = run_qr(data, "fm", 4, TrainConfig(epochs=1, batch_size=200, progress=False),
                 QRConfig(collisions=[2, 4], field_collisions={"f1": 3}), run_dir=tmp_path)
    rows = res["rows"]
    assert [r["variant"] for r in rows] == ["mult-c2", "mult-c4", "mult-per-field"]
    assert rows[0]["num_params"] == (6 + 2 + 15 + 2 + 3 + 2) * 4
    assert rows[1]["num_params"] == (3 + 4 + 8 + 4 + 2 + 4) * 4
    assert rows[2]["num_params"] == (12 + 10 + 3 + 5) * 4 and rows[2]["collisions"] == [1, 3, 1]
    with pytest.raises(ValueError, match="field_collisions"):
        QRConfig(field_collisions=[1, 2])
