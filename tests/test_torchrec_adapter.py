"""TorchRec adapter: a compression table where an ``EmbeddingBagCollection`` / ``EmbeddingCollection`` stood.

* the KJT contract against TorchRec's own modules (same weights -> same ``KeyedTensor`` / ``JaggedTensor``s):
  single- and multi-valued bags, empty bags, SUM and MEAN pooling, weighted bags, keys in another order;
* clear errors for what is not supported (shared tables, mixed dims, too long bags, ids out of range);
* a DLRM-like model (EBC + FM interaction + MLP) trained for a few hundred steps on MovieLens 100K with an OptEmbed
  table: AUC above chance, rows pruned, compact export equal to the masked model.

Skipped only when ``import torchrec`` fails (torchrec 1.9.2 + fbgemm-gpu-cpu load with torch 2.14.1 only; see
scripts/setup.sh).
"""
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optembed_ext.integrations as integrations
import optembed_ext.nn as oenn
from optembed_ext.export.torchrec import torchrec_available
from optembed_ext.integrations import torchrec as trec_adapter

pytestmark = pytest.mark.skipif(not torchrec_available(), reason="torchrec (with fbgemm-gpu-cpu) is not importable")

CARDS = {"a": 5, "b": 7, "c": 3}
D = 4


def _ebc(pooling=("SUM", "SUM", "SUM"), dim=D, weighted=False):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{n}", num_embeddings=c, embedding_dim=dim, feature_names=[n],
                                 pooling=getattr(PoolingType, p)) for (n, c), p in zip(CARDS.items(), pooling)]
    return EmbeddingBagCollection(tables=tables, is_weighted=weighted)


def _ec():
    from torchrec import EmbeddingCollection, EmbeddingConfig

    torch.manual_seed(0)
    return EmbeddingCollection(tables=[EmbeddingConfig(name=f"t_{n}", num_embeddings=c, embedding_dim=D,
                                                       feature_names=[n]) for n, c in CARDS.items()])


def _kjt(keys=("a", "b", "c"), B=4, max_len=3, seed=0, weights=False):
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for k in keys:
        ln = torch.randint(0, max_len + 1, (B,), generator=g)
        lengths.append(ln)
        values.append(torch.randint(0, CARDS[k], (int(ln.sum()),), generator=g))
    lengths = torch.cat(lengths).to(torch.int32)
    values = torch.cat(values)
    w = torch.rand(values.shape[0], generator=g) if weights else None
    return KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths, weights=w)


# ------------------------------------------------------------------------------------------- KJT contract
@pytest.mark.parametrize("method", ["uniform", "optembed"])
@pytest.mark.parametrize("pooling", [("SUM", "SUM", "SUM"), ("MEAN", "SUM", "MEAN")])
def test_ebc_contract_matches_torchrec(method, pooling):
    ebc = _ebc(pooling)
    ours = trec_adapter.from_torchrec(ebc, method, max_values=3)
    assert isinstance(ours, trec_adapter.TorchRecEmbeddingBagCollection) and ours.table.local_ids
    assert ours.table.feature_map.field_names == list(CARDS) and ours.table.feature_map.cardinalities == [5, 7, 3]
    kjt = _kjt(max_len=3)
    assert (kjt.lengths() == 0).any() and (kjt.lengths() > 1).any()  # empty and multi-valued bags
    want, got = ebc(kjt), ours(kjt)
    assert type(got) is type(want) and got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
    # OptEmbed at its start: thresholds 0 < every row's norm, all D dims kept -> the same pooled rows
    torch.testing.assert_close(got.values(), want.values())
    for k in CARDS:
        torch.testing.assert_close(got[k], want[k])


def test_ebc_weighted_bags_and_key_order():
    ebc = _ebc(weighted=True)
    ours = trec_adapter.from_torchrec(ebc, "uniform", max_values=3)
    assert ours.is_weighted()
    kjt = _kjt(weights=True, seed=3)
    torch.testing.assert_close(ours(kjt).values(), ebc(kjt).values())
    # keys in another order (and one extra key): looked up by name, as TorchRec does
    plain = trec_adapter.from_torchrec(_ebc(), "uniform", max_values=3)
    kjt2 = _kjt(keys=("c", "a", "b"), seed=4)
    torch.testing.assert_close(plain(kjt2).values(), _ebc()(kjt2).values())
    with pytest.raises(KeyError, match=r"lacks the features \['c'\]"):
        plain(_kjt(keys=("a", "b")))
    with pytest.raises(ValueError, match="needs weights"):
        ours(_kjt())


def test_ec_contract_matches_torchrec():
    from torchrec import JaggedTensor

    ec = _ec()
    ours = trec_adapter.from_torchrec(ec, "optembed", max_values=3)
    assert isinstance(ours, trec_adapter.TorchRecEmbeddingCollection)
    kjt = _kjt(seed=5)
    want, got = ec(kjt), ours(kjt)
    assert isinstance(got, dict) and list(got) == list(want)
    for k in want:
        assert isinstance(got[k], JaggedTensor)
        torch.testing.assert_close(got[k].values(), want[k].values())
        torch.testing.assert_close(got[k].lengths().long(), want[k].lengths().long())
        torch.testing.assert_close(got[k].offsets().long(), want[k].offsets().long())


def test_single_valued_default_gradients_and_pruned_rows():
    ebc = _ebc()
    ours = trec_adapter.from_torchrec(ebc, "optembed")                 # max_values=1: single-valued features
    ids = torch.tensor([[4, 6, 2], [0, 0, 0], [3, 1, 2]])
    kjt = trec_adapter.local_ids_to_kjt(ids, list(CARDS))
    torch.testing.assert_close(ours(kjt).values(), ebc(kjt).values())
    pooled = ours.embeddings(kjt)
    pooled.sum().backward()
    assert ours.table.weight.grad is not None and ours.table.threshold.grad is not None
    # too long bags, ids out of their feature's range: clear errors
    with pytest.raises(ValueError, match="feature 'a' has a bag of 2 ids.*max_values=1"):
        ours(_kjt_fixed({"a": [[1, 2], [0]], "b": [[1], [1]], "c": [[0], [0]]}))
    with pytest.raises(IndexError, match="field 1"):
        ours(trec_adapter.local_ids_to_kjt(torch.tensor([[0, 7, 0]]), list(CARDS)))
    # a row pruned by a frozen mask pools to zeros, and the compact form keeps the contract
    mask = torch.ones(15, dtype=torch.bool)
    mask[4] = False                                                    # feature a, id 4
    ours.table.freeze(mask, [4, 2, 3])
    ours.eval()
    out = ours.embeddings(kjt)
    assert not out[0, 0].any() and not out[0, 1, 2:].any()
    oenn.to_compact(ours)
    assert isinstance(ours.table, oenn.CompactEmbedding)
    torch.testing.assert_close(ours.embeddings(kjt), out)


def _kjt_fixed(bags):
    from torchrec import KeyedJaggedTensor

    values, lengths = [], []
    for k, per in bags.items():
        for bag in per:
            values += bag
            lengths.append(len(bag))
    return KeyedJaggedTensor(keys=list(bags), values=torch.tensor(values), lengths=torch.tensor(lengths,
                                                                                             dtype=torch.int32))


def test_pep_and_autodim_stand_in_too():
    ebc = _ebc(dim=8)
    kjt = _kjt(seed=7)
    for method, cls in (("pep", oenn.PEPEmbedding), ("autodim", oenn.AutoDimEmbedding)):
        ours = trec_adapter.from_torchrec(ebc, method, max_values=3)
        assert isinstance(ours.table, cls)
        out = ours(kjt)
        assert out.values().shape == (4, 24) and torch.isfinite(out.values()).all()
        ours.embeddings(kjt).sum().backward()


def test_unsupported_layouts_raise_clear_errors():
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

    shared = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", num_embeddings=5, embedding_dim=4,
                                                               feature_names=["a", "b"])])
    with pytest.raises(NotImplementedError, match="shared by the features"):
        trec_adapter.from_torchrec(shared)
    mixed = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t0", num_embeddings=5, embedding_dim=4, feature_names=["a"]),
        EmbeddingBagConfig(name="t1", num_embeddings=5, embedding_dim=8, feature_names=["b"])])
    with pytest.raises(NotImplementedError, match=r"embedding_dim \[4, 8\]"):
        trec_adapter.from_torchrec(mixed)
    mx = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t0", num_embeddings=5, embedding_dim=4,
                                                           feature_names=["a"])])
    mx.embedding_bag_configs()[0].pooling = PoolingType.NONE  # TorchRec's configs refuse it at construction
    with pytest.raises(NotImplementedError, match="only SUM and MEAN"):
        trec_adapter.from_torchrec(mx)
    with pytest.raises(TypeError, match="EmbeddingBagCollection or EmbeddingCollection"):
        trec_adapter.from_torchrec(nn.Embedding(3, 4))
    with pytest.raises(ValueError, match="max_values"):
        trec_adapter.from_torchrec(_ebc(), max_values=0)
    with pytest.raises(ValueError, match="no TorchRec"):
        trec_adapter.replace_embeddings(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------ DLRM-like on ML-100K
class DLRMLike(nn.Module):
    """TorchRec-style CTR model: EBC -> (B, F, D), FM second-order interaction + MLP over the flat embeddings."""

    def __init__(self, cards, names, dim):
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

        self.sparse = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"t_{n}", num_embeddings=c,
                                                                        embedding_dim=dim, feature_names=[n])
                                                     for n, c in zip(names, cards)])
        self.F, self.D = len(names), dim
        self.mlp = nn.Sequential(nn.Linear(self.F * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, kjt):
        emb = self.sparse(kjt).values().reshape(-1, self.F, self.D)      # KeyedTensor, key order = features
        fm = 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1)).sum(1)
        return fm + self.mlp(emb.flatten(1)).squeeze(1)


@pytest.fixture(scope="module")
def ml100k(shared_data):
    from optembed_ext.data import load_dataset

    root = shared_data / "ml-100k"
    if not (root / "u.data").exists():
        pytest.skip(f"MovieLens 100K not present at {root}")
    return load_dataset("movielens100k", str(root), progress=False)


def _auc(y, p):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(y), np.asarray(p)))


@pytest.mark.slow
def test_dlrm_like_torchrec_model_with_optembed_on_ml100k(ml100k):
    fmap = ml100k.feature_map
    names = fmap.field_names
    offsets = np.asarray(fmap.offsets)

    def kjt_of(split, rows=None):
        local = split.X - offsets
        local = local if rows is None else local[rows]
        return trec_adapter.local_ids_to_kjt(torch.as_tensor(local, dtype=torch.long), names)

    torch.manual_seed(0)
    model = DLRMLike(fmap.cardinalities, names, 16)
    init = torch.cat([model.sparse.embedding_bags[f"t_{n}"].weight.detach() for n in names])
    t0 = time.perf_counter()
    table, = integrations.replace_embeddings(model, "optembed", alpha=1e-2)   # dispatches to the TorchRec adapter
    assert isinstance(model.sparse, trec_adapter.TorchRecEmbeddingBagCollection) and model.sparse.table is table
    torch.testing.assert_close(table.weight.detach(), init)
    opt = oenn.make_optimizer(model, torch.optim.Adam, lr=3e-3, threshold_optimizer="adam", threshold_lr=3e-2)
    hook = oenn.SupernetHook(model)
    rows = np.random.default_rng(0).permutation(len(ml100k.train))[:40000]
    y = torch.as_tensor(ml100k.train.y[rows])
    kv, yv = kjt_of(ml100k.val), ml100k.val.y
    steps, B = 0, 512
    for epoch in range(2):
        model.train()
        perm = np.random.default_rng(epoch).permutation(len(rows))
        for s in range(0, len(perm) - B + 1, B):
            idx = perm[s:s + B]
            loss = F.binary_cross_entropy_with_logits(model(kjt_of(ml100k.train, rows[idx])), y[idx]) \
                + oenn.regularization(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        model.eval()
        with torch.no_grad():
            hook.update(_auc(yv, model(kv)))
    seconds = time.perf_counter() - t0
    assert hook.best_auc > 0.7, hook.history
    assert table.sparsity() > 0.05, table.threshold
    # the dims search feeds (B, F) ids: the model behind IdInput (one forward per candidate)
    Xv = torch.as_tensor(ml100k.val.X - offsets, dtype=torch.long)
    res = integrations.search_dims(trec_adapter.IdInput(model, names), (Xv, yv), generations=1, mutation_num=2,
                                   crossover_num=2)
    assert not res["batched"] and len(res["field_dims"]) == fmap.num_fields and res["val_auc"] > 0.6
    hook.freeze(field_dims=res["field_dims"])
    model.eval()
    with torch.no_grad():
        masked = model(kv)
    oenn.to_compact(model)
    assert isinstance(model.sparse.table, oenn.CompactEmbedding)
    with torch.no_grad():
        compact = model(kv)
    torch.testing.assert_close(compact, masked)
    print(f"\n[torchrec] steps {steps} best val AUC {hook.best_auc:.4f} row sparsity "
          f"{1 - hook.best_row_mask().float().mean():.3f} compact max diff {(compact - masked).abs().max():.2e} "
          f"({seconds:.1f}s)")


def test_readme_torchrec_example():
    """The README's TorchRec call, as written, on a DLRM-like model (KJT in, logits out)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```python\n", text.index("TorchRec (`EmbeddingBagCollection`")) + len("```python\n")
    block = text[start:text.index("```", start)]
    torch.manual_seed(0)
    model = DLRMLike(list(CARDS.values()), list(CARDS), D)
    kjt = trec_adapter.local_ids_to_kjt(torch.tensor([[4, 6, 2], [0, 1, 0]]), list(CARDS))
    with torch.no_grad():
        before = model(kjt)
    namespace = {"torch": torch, "F": F, "model": model, "kjt": kjt, "y": torch.tensor([1.0, 0.0]),
                 "make_optimizer": oenn.make_optimizer, "regularization": oenn.regularization}
    exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(model.sparse, trec_adapter.TorchRecEmbeddingBagCollection)
    assert isinstance(model.sparse.table, oenn.OptEmbedEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(model(kjt), before)  # TorchRec's weights copied: same logits at the start
    namespace["loss"].backward()
    namespace["opt"].step()
    assert set(namespace["opt"].optimizers) == {"dense", "threshold"}
