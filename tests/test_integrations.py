"""DeepCTR-Torch and torchfm adapters: a DeepFM of each library trained for a few hundred steps on MovieLens 100K
with an OptEmbed table (AUC above chance, rows pruned, compact export = masked model), plus the adapters' wiring.

The libraries are optional: the tests skip when they are not importable (CI installs them, scripts/setup.sh).
Known bugs of the pinned releases are worked around here, not in the library:

* torchfm 0.7.0 uses ``np.long``, removed in numpy 1.24: the fixture sets it to ``np.int64`` while a model is built;
* deepctr-torch 0.3.0 imports ``requests`` (not a declared dependency) and queries PyPI on import: the fixture puts
  a stub ``requests`` (whose ``get`` fails at once, so nothing goes to the network) in ``sys.modules``.
"""
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import optembed_ext.integrations as integrations
import optembed_ext.nn as oenn
from optembed_ext.data import load_dataset
from optembed_ext.integrations import deepctr as dc
from optembed_ext.integrations import torchfm as fm_adapter

DIM = 16


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ml100k(shared_data):
    root = shared_data / "ml-100k"
    if not (root / "u.data").exists():
        pytest.skip(f"MovieLens 100K not present at {root}")
    return load_dataset("movielens100k", str(root))


@pytest.fixture
def torchfm_dfm(monkeypatch):
    """torchfm's DeepFM class (np.long restored for the duration of the test)."""
    if not hasattr(np, "long"):
        monkeypatch.setattr(np, "long", np.int64, raising=False)
    pytest.importorskip("torchfm")
    from torchfm.model.dfm import DeepFactorizationMachineModel

    return DeepFactorizationMachineModel


@pytest.fixture
def deepctr():
    """deepctr_torch's (DeepFM, SparseFeat), imported with a network-less stub of ``requests`` when it is absent."""
    if "requests" not in sys.modules:
        try:
            import requests  # noqa: F401
        except ImportError:
            stub = types.ModuleType("requests")
            stub.codes = types.SimpleNamespace(ok=200)

            def _get(*args, **kwargs):
                raise OSError("network access disabled in the tests")

            stub.get = _get
            sys.modules["requests"] = stub
    pytest.importorskip("deepctr_torch")
    from deepctr_torch.inputs import SparseFeat
    from deepctr_torch.models import DeepFM

    return DeepFM, SparseFeat


def _auc(y, p):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(y), np.asarray(p)))


def _local(split, fmap):
    return split.X - np.asarray(fmap.offsets)


# ------------------------------------------------------------------------------------------------- torchfm
def test_torchfm_deepfm_optembed_on_ml100k(ml100k, torchfm_dfm):
    torch.manual_seed(0)
    fmap = ml100k.feature_map
    rows = np.random.default_rng(0).permutation(len(ml100k.train))[:40000]
    X, y = torch.as_tensor(_local(ml100k.train, fmap)[rows]), torch.as_tensor(ml100k.train.y[rows])
    Xv, yv = torch.as_tensor(_local(ml100k.val, fmap)), ml100k.val.y
    model = torchfm_dfm(fmap.cardinalities, DIM, (64, 32), 0.0)
    init = model.embedding.embedding.weight.detach().clone()
    t0 = time.perf_counter()
    # the adapter: one call; then the plain loop's two lines (optimizer, loss + regulariser)
    table, = fm_adapter.replace_embeddings(model, "optembed", alpha=1e-2)
    opt = oenn.make_optimizer(model, torch.optim.Adam, lr=3e-3, threshold_optimizer="adam", threshold_lr=3e-2)
    hook = oenn.SupernetHook(model)
    assert model.embedding is table and table.local_ids and table.sample_dims
    torch.testing.assert_close(table.weight.detach(), init)  # torchfm's xavier start kept
    steps, B = 0, 512
    for epoch in range(2):
        model.train()
        perm = torch.randperm(len(X))
        for s in range(0, len(perm) - B + 1, B):
            idx = perm[s:s + B]
            loss = F.binary_cross_entropy(model(X[idx]), y[idx]) + oenn.regularization(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        model.eval()
        with torch.no_grad():
            hook.update(_auc(yv, model(Xv)))
    seconds = time.perf_counter() - t0
    assert steps <= 300
    assert hook.best_auc > 0.75, hook.history
    assert table.sparsity() > 0.1, table.threshold
    # dims search (one candidate at a time: torchfm has no predict_from_embeddings), freeze, compact export
    res = integrations.search_dims(model, (Xv, yv), generations=2, mutation_num=4, crossover_num=4)
    assert not res["batched"] and len(res["field_dims"]) == fmap.num_fields
    hook.freeze(field_dims=res["field_dims"])
    model.eval()
    with torch.no_grad():
        masked = model(Xv)
    oenn.to_compact(model)
    assert isinstance(model.embedding, oenn.CompactEmbedding)
    with torch.no_grad():
        compact = model(Xv)
    torch.testing.assert_close(compact, masked)
    row_sparsity = 1 - hook.best_row_mask().float().mean()
    print(f"\n[torchfm] steps {steps} best val AUC {hook.best_auc:.4f} row sparsity {row_sparsity:.3f} "
          f"searched AUC {res['val_auc']:.4f} compact max diff {(compact - masked).abs().max():.2e} ({seconds:.1f}s)")


def test_torchfm_adapter_wiring(torchfm_dfm):
    model = torchfm_dfm([4, 6, 3], 8, (8,), 0.0)
    with pytest.raises(ValueError, match="embed_dim"):
        fm_adapter.replace_embeddings(model, "optembed", embed_dim=4)
    x = torch.tensor([[3, 5, 2], [0, 0, 0]])
    model.eval()
    before = model(x)
    table, = integrations.replace_embeddings(model, "uniform")  # the generic entry point dispatches to torchfm
    assert fm_adapter.cardinalities_of(types.SimpleNamespace(offsets=np.array([0, 4, 10]),
                                       embedding=torch.nn.Embedding(13, 2))) == [4, 6, 3]
    torch.testing.assert_close(model(x), before)
    with pytest.raises(IndexError, match="field 1"):
        model(torch.tensor([[0, 6, 0]]))  # torchfm itself would read field 2's row
    pep, = fm_adapter.replace_embeddings(torchfm_dfm([4, 6, 3], 8, (8,), 0.0), "pep")
    assert isinstance(pep, oenn.PEPEmbedding) and pep.local_ids


# ----------------------------------------------------------------------------------------------- DeepCTR
def _columns(fmap, SparseFeat):
    return [SparseFeat(n, c, embedding_dim=DIM) for n, c in zip(fmap.field_names, fmap.cardinalities)]


def _xdict(split, fmap, rows=None):
    local = _local(split, fmap)
    if rows is not None:
        local = local[rows]
    return {n: local[:, i] for i, n in enumerate(fmap.field_names)}


def test_deepctr_deepfm_optembed_on_ml100k(ml100k, deepctr):
    DeepFM, SparseFeat = deepctr
    fmap = ml100k.feature_map
    cols = _columns(fmap, SparseFeat)
    model = DeepFM(cols, cols, dnn_hidden_units=(64, 32), device="cpu", seed=0)
    t0 = time.perf_counter()
    # the adapter: replace the tables, compile with the combined optimizer, fit with the supernet callback
    table = dc.replace_embeddings(model, "optembed", alpha=1e-2)
    model.compile(oenn.make_optimizer(model, torch.optim.Adam, lr=3e-3, threshold_optimizer="adam", threshold_lr=3e-2),
                  "binary_crossentropy", metrics=["auc"])
    callback = dc.SupernetCallback(model)
    rows = np.random.default_rng(0).permutation(len(ml100k.train))[:40000]
    history = model.fit(_xdict(ml100k.train, fmap, rows), ml100k.train.y[rows], batch_size=512, epochs=2,
                        verbose=0, validation_data=(_xdict(ml100k.val, fmap), ml100k.val.y),
                        callbacks=[callback])
    seconds = time.perf_counter() - t0
    hook = callback.hook
    assert len(hook.history) == 2 and hook.best_auc == max(history.history["val_auc"])
    assert hook.best_auc > 0.75, history.history
    assert table.sparsity() > 0.1
    # search on DeepCTR's own input format, freeze, compact export
    Xv = dc.model_input(model, _xdict(ml100k.val, fmap))
    res = integrations.search_dims(model, (Xv, ml100k.val.y), generations=2, mutation_num=4, crossover_num=4)
    hook.freeze(field_dims=res["field_dims"])
    masked = model.predict(_xdict(ml100k.val, fmap), 4096)
    oenn.to_compact(model)
    assert isinstance(dc.table_of(model), oenn.CompactEmbedding)
    compact = model.predict(_xdict(ml100k.val, fmap), 4096)
    np.testing.assert_allclose(compact, masked, rtol=0, atol=1e-6)
    print(f"\n[deepctr] best val AUC {hook.best_auc:.4f} sparsity {table.sparsity():.3f} searched AUC "
          f"{res['val_auc']:.4f} compact AUC {_auc(ml100k.val.y, compact):.4f} ({seconds:.1f}s)")


def test_deepctr_adapter_l2_list_and_summed_loss(deepctr):
    DeepFM, SparseFeat = deepctr
    from optembed_ext.data import FeatureMap

    fmap = FeatureMap("toy", ["a", "b", "c"], [5, 7, 3])
    cols = _columns(fmap, SparseFeat)
    model = DeepFM(cols, cols, dnn_hidden_units=(8,), l2_reg_embedding=1e-3, device="cpu", seed=0)
    old = {id(p) for p in model.embedding_dict.parameters()}
    table = integrations.replace_embeddings(model, "optembed", alpha=0.5)[0]
    assert dc.table_of(model) is table and table.local_ids
    listed = [w[1] if isinstance(w, tuple) else w for ws, _, _ in model.regularization_weight for w in ws]
    assert not ({id(w) for w in listed} & old)
    assert any(w is table.weight for w in listed) and not any(w is table.threshold for w in listed)
    x = dc.model_input(model, {"a": np.array([0, 4, 2]), "b": np.array([6, 1, 0]), "c": np.array([2, 2, 1])})
    model.train()
    model(x)
    l2 = 1e-3 * table.weight.detach().pow(2).sum()
    linear_l2 = sum(1e-5 * p.detach().pow(2).sum() for p in model.linear_model.parameters())
    expected = l2 + linear_l2 + 3 * 0.5 * 3  # + batch_size * alpha * sum_f exp(-0): DeepCTR sums the loss
    assert model.get_regularization_loss().item() == pytest.approx(float(expected), rel=1e-5)
    model.eval()
    assert model.get_regularization_loss().item() == pytest.approx(float(l2 + linear_l2), rel=1e-5)
    with pytest.raises(IndexError, match="field 1"):
        model.train()(dc.model_input(model, {"a": np.array([0, 0]), "b": np.array([7, 0]), "c": np.array([0, 0])}))
    with pytest.raises(ValueError, match="already"):
        dc.replace_embeddings(model)
    # compile("adam") builds the combined optimizer (thresholds: own SGD, no weight decay) at DeepCTR's lr
    model.compile("adam", "binary_crossentropy")
    assert isinstance(model.optim, oenn.CombinedOptimizer)
    assert model.optim["threshold"].param_groups[0]["params"] == [table.threshold]
    assert model.optim["dense"].param_groups[0]["lr"] == 1e-3
