"""The plug-in API: tables from plain cardinalities, local ids, optimizer/regulariser helpers, supernet hook,
dimension search on any model, unfreeze, compact export, torch.compile / torch.export (issue 11, problems 1-8)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optembed_ext.data import FeatureMap, make_synthetic
from optembed_ext.nn import (AutoDimEmbedding, CompactEmbedding, MixedDimEmbedding, OptEmbedEmbedding, PEPEmbedding,
                             QREmbedding, SupernetHook, UniformEmbedding, AutoFieldEmbedding, FieldSelectedEmbedding,
                             make_optimizer, regularization, to_compact)
from optembed_ext.integrations import replace_embeddings, search_dims

CARDS = [5, 3, 7, 4]


def _local_ids(batch, gen, cards=CARDS):
    return torch.stack([torch.randint(0, c, (batch,), generator=gen) for c in cards], 1)


class PlainFM(nn.Module):
    """Somebody's own CTR model: an embedding layer taking per-field local ids, a linear head over the FM term and
    an MLP. It knows nothing of optembed_ext."""

    def __init__(self, cards, dim, embedding=None):
        super().__init__()
        self.embedding = embedding if embedding is not None else nn.Embedding(sum(cards), dim)
        self.mlp = nn.Sequential(nn.Linear(len(cards) * dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        e = self.embedding(x)
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        return fm + self.mlp(e.flatten(1)).squeeze(1)


def _synthetic_local(num_samples=6000, seed=0):
    data = make_synthetic(num_samples=num_samples, num_fields=5, vocab_sizes=[20, 15, 30, 8, 12], seed=seed)
    off = np.asarray(data.feature_map.offsets)
    split = lambda s: (torch.as_tensor(s.X - off), torch.as_tensor(s.y))  # noqa: E731
    return data.feature_map.cardinalities, split(data.train), split(data.val)


# ------------------------------------------------------------------------------------------ README example
def _readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index(heading)
    start = text.index("```python\n", start) + len("```python\n")
    return text[start:text.index("```", start)]


def test_readme_three_line_example():
    """The README's "Use it in your own model" example, line for line (plain PyTorch loop)."""
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    cards, (X, y), (Xv, yv) = _synthetic_local()
    model = PlainFM(cards, 16)  # somebody's model, its table an nn.Embedding
    loader = [(X[s:s + 256], y[s:s + 256]) for s in range(0, len(X), 256)] * 6

    # the README's code block itself, executed as written
    namespace = {"torch": torch, "F": F, "model": model, "cards": cards, "loader": loader}
    exec(compile(_readme_block("### Use it in your own model"), "README.md", "exec"), namespace)
    opt = namespace["opt"]

    model.eval()
    with torch.no_grad():
        auc = roc_auc_score(yv.numpy(), model(Xv).numpy())
    assert auc > 0.6, auc  # the planted signal gives 0.71
    assert set(opt.optimizers) == {"dense", "threshold"}
    assert model.embedding.threshold.abs().sum() > 0  # the thresholds were trained


# ------------------------------------------------------------------------- problem 1: from_cardinalities
@pytest.mark.parametrize("cls,args", [(OptEmbedEmbedding, ()), (PEPEmbedding, ()), (UniformEmbedding, ()),
                                      (AutoDimEmbedding, ()), (QREmbedding, ()), (AutoFieldEmbedding, ()),
                                      (MixedDimEmbedding, ([2, 4, 8, 3],)), (FieldSelectedEmbedding, ([0, 2],))])
def test_from_cardinalities_matches_feature_map_module(cls, args):
    gen = torch.Generator().manual_seed(0)
    local = cls.from_cardinalities(CARDS, 8, *args)
    assert local.local_ids and local.feature_map.cardinalities == CARDS and local.num_fields == 4
    glob = cls(FeatureMap("x", [f"f{i}" for i in range(4)], CARDS), 8, *args)
    glob.load_state_dict(local.state_dict())
    local.eval(), glob.eval()
    ids = _local_ids(9, gen)
    offsets = torch.tensor(local.feature_map.offsets)
    torch.testing.assert_close(local(ids), glob(ids + offsets))
    g2 = cls.from_cardinalities(CARDS, 8, *args, local_ids=False, field_names=list("abcd"))
    assert not g2.local_ids and g2.feature_map.field_names == list("abcd")


# -------------------------------------------------------------------------------- problem 2: local ids
def test_local_ids_passed_as_global_ids_raise():
    fmap = FeatureMap("x", list("abcd"), [10, 10, 10, 10])
    emb = OptEmbedEmbedding(fmap, 16)
    with pytest.raises(IndexError, match="ids look like per-field local ids: pass local_ids=True"):
        emb(torch.tensor([[5, 5, 5, 5]]))
    # a global id in another field's block is an error too (it used to read that field's rows)
    with pytest.raises(IndexError, match="field 1"):
        emb(torch.tensor([[5, 5, 25, 35]]))
    emb(torch.tensor([[5, 15, 25, 35]]))  # valid global ids
    for cls in (UniformEmbedding, PEPEmbedding):
        with pytest.raises(IndexError, match="local_ids=True"):
            cls(fmap, 4)(torch.tensor([[5, 5, 5, 5]]))


def test_local_ids_range_checked_per_field():
    emb = OptEmbedEmbedding.from_cardinalities([10, 3], 4)
    emb(torch.tensor([[9, 2]]))
    with pytest.raises(IndexError, match="field 1"):
        emb(torch.tensor([[0, 3]]))  # 3 >= cardinality of field 1 (it used to read field 1's neighbour)
    with pytest.raises(IndexError, match="local ids"):
        emb(torch.tensor([[-1, 0]]))
    compact = emb.to_compact()
    with pytest.raises(IndexError, match="field 1"):
        compact(torch.tensor([[0, 3]]))


def test_range_checks_are_device_side_asserts_when_compiled():
    fmap = FeatureMap("x", list("abcd"), [10, 10, 10, 10])
    emb = OptEmbedEmbedding(fmap, 8).eval()
    compiled = torch.compile(emb, fullgraph=True, backend="eager")
    compiled(torch.tensor([[5, 15, 25, 35], [0, 10, 20, 30]]))
    with pytest.raises(RuntimeError, match="local_ids=True"):
        compiled(torch.tensor([[5, 5, 5, 5], [1, 1, 1, 1]]))
    local = OptEmbedEmbedding.from_cardinalities([10, 3], 4).eval()
    compiled = torch.compile(local, fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match="local ids"):
        compiled(torch.tensor([[0, 3], [1, 1]]))


# ------------------------------------------------------------------------------ problem 3: regulariser
def test_regularization_sums_modules_and_scales_for_summed_loss():
    a = OptEmbedEmbedding.from_cardinalities(CARDS, 4, alpha=0.5)
    b = OptEmbedEmbedding.from_cardinalities([3, 3], 4, alpha=0.25)
    model = nn.ModuleDict({"a": a, "b": b, "head": nn.Linear(2, 1)})
    expected = 0.5 * 4 + 0.25 * 2  # alpha * sum exp(-0) per module
    assert regularization(model).item() == pytest.approx(expected)
    assert regularization(model, "sum", batch_size=128).item() == pytest.approx(128 * expected)
    assert regularization(model, "sum", batch_size=torch.tensor(64)).item() == pytest.approx(64 * expected)
    with pytest.raises(ValueError, match="batch_size"):
        regularization(model, "sum")
    with pytest.raises(ValueError, match="loss_reduction"):
        regularization(model, "none")
    assert regularization(nn.Linear(2, 1)).item() == 0.0
    a.freeze()
    assert regularization(model).item() == pytest.approx(0.25 * 2)


# ------------------------------------------------------------------------------- problem 4: optimizer
def test_make_optimizer_groups_and_threshold_sgd():
    torch.manual_seed(0)
    emb = OptEmbedEmbedding.from_cardinalities(CARDS, 4)
    assert emb.threshold_lr == pytest.approx(1e-2)  # the shipped configs' value, not 3e-4
    model = PlainFM(CARDS, 4, embedding=emb)
    opt = make_optimizer(model, torch.optim.Adam, lr=1e-3, weight_decay=0.1)
    dense, thr = opt["dense"], opt["threshold"]
    assert isinstance(dense, torch.optim.Adam) and isinstance(thr, torch.optim.SGD)
    assert thr.param_groups[0]["params"] == [emb.threshold]
    assert thr.param_groups[0]["lr"] == pytest.approx(1e-2) and thr.param_groups[0]["weight_decay"] == 0.0
    dense_params = {id(p) for g in dense.param_groups for p in g["params"]}
    assert id(emb.threshold) not in dense_params and id(emb.weight) in dense_params
    assert all(g["weight_decay"] == 0.1 for g in dense.param_groups)
    assert len(dense_params) + 1 == len(list(model.parameters()))
    # one step: the thresholds follow plain SGD at threshold_lr, with no weight decay
    x = _local_ids(32, torch.Generator().manual_seed(1))
    loss = model(x).sigmoid().mean() + regularization(model)
    opt.zero_grad()
    loss.backward()
    before, grad = emb.threshold.detach().clone(), emb.threshold.grad.clone()
    opt.step()
    torch.testing.assert_close(emb.threshold.detach(), before - 1e-2 * grad)
    # state dict round trip; the Adam variant and an explicit threshold_lr
    state = opt.state_dict()
    opt2 = make_optimizer(model, torch.optim.Adam, lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(state)
    assert opt2["dense"].state_dict()["state"].keys() == dense.state_dict()["state"].keys()
    opt3 = make_optimizer(model, "sgd", lr=0.1, threshold_optimizer="adam", threshold_lr=0.5)
    assert isinstance(opt3["threshold"], torch.optim.Adam) and opt3["threshold"].param_groups[0]["lr"] == 0.5
    assert len(opt3.param_groups) == len(opt3["dense"].param_groups) + 1
    emb.freeze()
    assert "threshold" not in make_optimizer(model, torch.optim.Adam).optimizers


def test_make_optimizer_sparse_table():
    emb = OptEmbedEmbedding.from_cardinalities(CARDS, 4, sparse=True)
    model = PlainFM(CARDS, 4, embedding=emb)
    opt = make_optimizer(model, torch.optim.Adam, lr=1e-2)
    assert isinstance(opt["sparse"], torch.optim.SparseAdam) and opt["sparse"].param_groups[0]["params"] == [emb.weight]
    x = _local_ids(16, torch.Generator().manual_seed(7))
    before = emb.weight.detach().clone()
    loss = model(x).sigmoid().mean() + regularization(model)
    opt.zero_grad()
    loss.backward()
    assert emb.weight.grad.is_sparse
    opt.step()
    assert not torch.equal(before, emb.weight.detach())
    with pytest.raises(ValueError, match="sparse"):
        make_optimizer(model, torch.optim.RMSprop)


def test_make_optimizer_other_tables():
    pep = PEPEmbedding.from_cardinalities(CARDS, 4, threshold_lr=0.5)
    opt = make_optimizer(PlainFM(CARDS, 4, embedding=pep), torch.optim.Adam, lr=1e-3, weight_decay=1e-4)
    assert set(opt.optimizers) == {"dense"}
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(pep.s)] == 0.5 and lrs[id(pep.weight)] == 1e-3
    ad = AutoDimEmbedding.from_cardinalities(CARDS, 4, candidates=[2, 4])
    opt = make_optimizer(PlainFM(CARDS, 4, embedding=ad), torch.optim.Adam, lr=1e-3)
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert groups[id(ad.alpha)]["weight_decay"] == 0.0  # architecture weights trained on the training loss


# ---------------------------------------------------------------------------------- problem 5: supernet
def test_supernet_hook_samples_dims_in_forward_and_tracks_best_mask():
    torch.manual_seed(0)
    emb = OptEmbedEmbedding.from_cardinalities(CARDS, 8)
    model = PlainFM(CARDS, 8, embedding=emb)
    hook = SupernetHook(model)
    x = _local_ids(64, torch.Generator().manual_seed(2))
    emb.train()
    out = emb(x)  # no set_dims: every sample keeps a random prefix of each field
    kept = (out != 0).sum(-1)
    assert kept.min() < 8 and kept.max() <= 8 and len(torch.unique(kept)) > 2
    emb.eval()
    assert bool((emb(x) != 0).all())
    assert hook.update(0.7) and not hook.update(0.6)
    with torch.no_grad():
        emb.threshold.fill_(10.0)
    assert hook.update(0.8)
    assert int(hook.best_row_mask().sum()) == 0 and hook.best_auc == 0.8
    hook.freeze(field_dims=[2, 3, 4, 5])
    assert emb.frozen and not emb.sample_dims and emb.field_dims() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="no OptEmbedEmbedding"):
        SupernetHook(nn.Linear(2, 2))


def test_search_dims_on_foreign_and_own_models():
    """The one-at-a-time fallback (a model without predict_from_embeddings) finds what the batched search finds."""
    from optembed_ext.models import build_model

    data = make_synthetic(num_samples=3000, num_fields=4, vocab_sizes=[10, 8, 6, 12], seed=1)
    emb = OptEmbedEmbedding(data.feature_map, 6)
    own = build_model("fm", data.feature_map, emb)
    with torch.no_grad():
        emb.threshold.fill_(0.05)
    kw = dict(generations=2, mutation_num=4, crossover_num=4, seed=3)
    batched = search_dims(own, data.val, **kw)
    assert batched["batched"]

    class Foreign(nn.Module):  # no predict_from_embeddings, no .embedding attribute
        def __init__(self):
            super().__init__()
            self.inner = own

        def forward(self, x):
            return torch.sigmoid(self.inner(x))  # probabilities: the AUC ranking is the same

    single = search_dims(Foreign(), (torch.as_tensor(data.val.X), data.val.y), **kw)
    assert not single["batched"]
    assert single["field_dims"] == batched["field_dims"]
    assert single["val_auc"] == pytest.approx(batched["val_auc"])
    assert emb.dims is None and not emb.frozen


# ------------------------------------------------------------------------------------ problem 6: unfreeze
def test_unfreeze_and_loading_pre_freeze_weights_into_frozen_module():
    emb = OptEmbedEmbedding.from_cardinalities(CARDS, 4)
    pre = {k: v.clone() for k, v in emb.state_dict().items()}
    mask = torch.zeros(emb.num_features, dtype=torch.bool)
    mask[::2] = True
    emb.freeze(mask, [1, 2, 3, 4])
    with torch.no_grad():
        emb.weight.add_(1.0)
    emb.load_state_dict(pre)  # strict: the frozen masks are kept
    torch.testing.assert_close(emb.weight.detach(), pre["weight"])
    assert emb.frozen and torch.equal(emb.fixed_row_mask, mask) and emb.field_dims() == [1, 2, 3, 4]
    emb.unfreeze()
    assert not emb.frozen and emb.fixed_field_dims is None and emb.threshold.requires_grad
    assert emb.regularization().item() > 0
    opt = make_optimizer(emb, torch.optim.Adam)
    assert "threshold" in opt.optimizers


# ------------------------------------------------------------------------------- problem 7: compact export
@pytest.mark.parametrize("oov", [False, True])
def test_to_compact_same_contract_and_outputs(oov):
    gen = torch.Generator().manual_seed(0)
    emb = OptEmbedEmbedding.from_cardinalities(CARDS, 6, oov=oov)
    with torch.no_grad():
        emb.weight.normal_(generator=gen)
        emb.threshold.copy_(torch.tensor([3.0, 5.0, 4.0, 100.0]))
    emb.eval()
    ids = _local_ids(50, gen)
    compact = emb.to_compact()
    assert isinstance(compact, CompactEmbedding) and compact.local_ids
    torch.testing.assert_close(compact(ids), emb(ids))
    assert compact.num_params() == emb.num_params() < emb.dense_size()
    again = CompactEmbedding.from_config(compact.feature_map, compact.config())  # the saved form keeps local_ids
    again.load_state_dict(compact.state_dict())
    assert again.local_ids
    torch.testing.assert_close(again(ids), emb(ids))
    emb.freeze(emb.row_mask(), [1, 6, 3, 2])
    torch.testing.assert_close(emb.to_compact()(ids), emb(ids))
    pep = PEPEmbedding.from_cardinalities(CARDS, 6, threshold_init=-1.0).eval()
    torch.testing.assert_close(pep.to_compact()(ids), pep(ids))


def test_to_compact_and_replace_embeddings_on_a_foreign_model():
    torch.manual_seed(0)
    model = PlainFM(CARDS, 4, embedding=nn.Embedding(sum(CARDS), 4))
    offsets = torch.tensor(FeatureMap("x", list("abcd"), CARDS).offsets)
    x = _local_ids(20, torch.Generator().manual_seed(3)) + offsets  # this model takes global ids
    before = model(x)
    (table,) = replace_embeddings(model, "uniform", target="embedding", cardinalities=CARDS)
    assert model.embedding is table and not table.local_ids
    torch.testing.assert_close(model(x), before)  # the weights were copied
    model.embedding = OptEmbedEmbedding.from_cardinalities(CARDS, 4, local_ids=False)
    model.eval()
    masked = model(x)
    to_compact(model)
    assert isinstance(model.embedding, CompactEmbedding)
    torch.testing.assert_close(model(x), masked)
    with pytest.raises(ValueError, match="target"):
        replace_embeddings(nn.Linear(2, 2))


# -------------------------------------------------------------------------- problem 8: compile and export
def _modules():
    mods = {
        "uniform": lambda: UniformEmbedding.from_cardinalities(CARDS, 8),
        "optembed": lambda: OptEmbedEmbedding(FeatureMap("x", list("abcd"), CARDS), 8),
        "optembed_local": lambda: OptEmbedEmbedding.from_cardinalities(CARDS, 8, sample_dims=True, oov=True),
        "optembed_frozen": lambda: _frozen(),
        "compact": lambda: OptEmbedEmbedding.from_cardinalities(CARDS, 8).to_compact(),
        "pep": lambda: PEPEmbedding.from_cardinalities(CARDS, 8),
        "autodim": lambda: AutoDimEmbedding.from_cardinalities(CARDS, 8, candidates=[2, 4, 8]),
        "mixed": lambda: MixedDimEmbedding.from_cardinalities(CARDS, 8, [2, 4, 8, 2]),
        "qr": lambda: QREmbedding.from_cardinalities(CARDS, 8),
        "autofield": lambda: AutoFieldEmbedding.from_cardinalities(CARDS, 8),
        "field_selected": lambda: FieldSelectedEmbedding.from_cardinalities(CARDS, 8, [0, 2]),
    }
    return mods


def _frozen():
    emb = OptEmbedEmbedding.from_cardinalities(CARDS, 8)
    emb.freeze(emb.row_mask(), [2, 3, 8, 1])
    return emb


def _example_ids(module):
    ids = _local_ids(6, torch.Generator().manual_seed(4))
    return ids if module.local_ids else ids + module._id_start


@pytest.mark.parametrize("name", sorted(_modules()))
@pytest.mark.parametrize("training", [True, False])
def test_default_modules_compile_fullgraph_and_export(name, training):
    torch.manual_seed(0)
    module = _modules()[name]().train(training)
    assert getattr(module, "check_indices", True)  # the default configuration, checks on
    ids = _example_ids(module)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(ids)
    assert out.shape == (6, 4, 8)
    if training:
        out.sum().backward()
        assert any(p.grad is not None for p in module.parameters())
    else:
        torch.testing.assert_close(out, module(ids))
    exported = torch.export.export(module, (ids,))
    res = exported.module()(ids)
    if not training:
        torch.testing.assert_close(res, module(ids))


def test_exported_compact_runs_from_saved_pt2(tmp_path):
    emb = OptEmbedEmbedding.from_cardinalities(CARDS, 8)
    with torch.no_grad():
        emb.threshold.fill_(0.3)
    compact = emb.eval().to_compact()
    batch = torch.export.Dim("batch")
    ids = _local_ids(4, torch.Generator().manual_seed(5))
    ep = torch.export.export(compact, (ids,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, tmp_path / "table.pt2")
    loaded = torch.export.load(tmp_path / "table.pt2").module()
    other = _local_ids(33, torch.Generator().manual_seed(6))
    torch.testing.assert_close(loaded(other), emb(other))
    with pytest.raises(RuntimeError, match="local ids"):
        loaded(torch.tensor([[5, 0, 0, 0], [0, 0, 0, 0]]))


@pytest.mark.parametrize("cls", [OptEmbedEmbedding, PEPEmbedding, UniformEmbedding, AutoDimEmbedding, QREmbedding])
def test_torchscript_is_refused_with_a_message_pointing_to_torch_export(cls):
    """torch.jit.script (deprecated by PyTorch) failed with "Unknown type annotation: 'bool'" from inside the
    TorchScript compiler; the tables refuse it with a message naming the supported ways to deploy."""
    import warnings

    table = cls.from_cardinalities([3, 4], 8)
    compact = OptEmbedEmbedding.from_cardinalities([3, 4], 8).to_compact()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's own deprecation warning
        for obj in (table, nn.Sequential(table), compact):
            with pytest.raises(TypeError, match=r"does not support TorchScript.*torch\.export"):
                torch.jit.script(obj)
