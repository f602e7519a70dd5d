"""CTR models and the uniform embedding: shapes, gradients, stacked evaluation, formulas against plain PyTorch."""
import pytest
import torch

from optembed_ext.models import MODELS, CTRModel, build_model, model_options
from optembed_ext.nn import EmbeddingModule, UniformEmbedding


class TinyFeatureMap:
    """Just what models and embeddings read from a feature map (odd sizes on purpose)."""

    def __init__(self, cardinalities=(3, 5, 1, 7, 2)):
        self.cardinalities = list(cardinalities)
        self.field_names = [f"f{i}" for i in range(len(cardinalities))]
        self.dataset = "tiny"

    @property
    def num_fields(self):
        return len(self.cardinalities)

    @property
    def num_features(self):
        return sum(self.cardinalities)

    @property
    def offsets(self):
        out, acc = [], 0
        for c in self.cardinalities:
            out.append(acc)
            acc += c
        return out


SMALL = {"mlp_dims": (16, 8), "cross_layers": 2, "attention_layers": 2, "num_heads": 2}


def random_ids(fm, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, c, (batch,), generator=g) + o for c, o in zip(fm.cardinalities, fm.offsets)]
    return torch.stack(cols, dim=1)


def make(name, fm, dim=6, **extra):
    torch.manual_seed(0)
    return build_model(name, fm, UniformEmbedding(fm, dim), **{**SMALL, **extra})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_shapes(name):
    fm = TinyFeatureMap()
    model = make(name, fm)
    assert isinstance(model, CTRModel)
    ids = random_ids(fm, 9)
    logits = model(ids)
    assert logits.shape == (9,) and logits.dtype == torch.float32
    logits.sum().backward()
    grad = model.embedding.weight.grad
    assert grad is not None and grad.shape == model.embedding.weight.shape
    # only rows that were looked up receive gradient
    untouched = torch.ones(fm.num_features, dtype=torch.bool)
    untouched[ids.unique()] = False
    assert grad[untouched].abs().sum() == 0
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {n}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_predict_from_embeddings_stacked(name):
    fm = TinyFeatureMap()
    model = make(name, fm).eval()
    ids = random_ids(fm, 7, seed=1)
    with torch.no_grad():
        assert torch.allclose(model(ids), model.predict_from_embeddings(model.embedding(ids), ids))
        cands = torch.randn(4, 7, fm.num_fields, 6)
        one_by_one = torch.stack([model.predict_from_embeddings(c, ids) for c in cands])
        # leading candidate dimension with broadcast ids, and candidates flattened into the batch
        stacked = model.predict_from_embeddings(cands, ids)
        flat = model.predict_from_embeddings(cands.reshape(28, fm.num_fields, 6), ids.repeat(4, 1))
    assert stacked.shape == (4, 7)
    torch.testing.assert_close(stacked, one_by_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat.reshape(4, 7), one_by_one, rtol=1e-5, atol=1e-6)


def test_fm_formula():
    fm = TinyFeatureMap()
    model = make("fm", fm, dim=4)
    with torch.no_grad():
        model.linear.weight.normal_()
        model.linear.bias.fill_(0.3)
    ids = random_ids(fm, 6, seed=2)
    e = model.embedding.weight[ids]  # (B, F, D)
    expected = model.linear.bias + model.linear.weight[ids, 0].sum(1)
    for i in range(fm.num_fields):
        for j in range(i + 1, fm.num_fields):
            expected = expected + (e[:, i] * e[:, j]).sum(-1)
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)


def test_deepfm_is_fm_plus_mlp():
    fm = TinyFeatureMap()
    torch.manual_seed(0)
    emb = UniformEmbedding(fm, 4)
    deep = build_model("deepfm", fm, emb, mlp_dims=(8,)).eval()
    plain = build_model("fm", fm, emb)
    plain.linear.load_state_dict(deep.linear.state_dict())
    ids = random_ids(fm, 5, seed=3)
    mlp = deep.mlp(emb(ids).flatten(1)).squeeze(1)
    torch.testing.assert_close(deep(ids), plain(ids) + mlp)


def test_ipnn_inner_products():
    fm = TinyFeatureMap()
    model = make("ipnn", fm, dim=3)
    e = torch.randn(2, fm.num_fields, 3)
    prods = model.product(e)
    expected = torch.stack([(e[:, i] * e[:, j]).sum(-1) for i in range(fm.num_fields)
                            for j in range(i + 1, fm.num_fields)], dim=1)
    torch.testing.assert_close(prods, expected)


def test_cross_network_formula():
    fm = TinyFeatureMap()
    model = make("dcn", fm, dim=2, cross_layers=2)
    x0 = torch.randn(3, fm.num_fields * 2)
    with torch.no_grad():
        for b in model.cross.b:
            b.normal_()
    x = x0
    for w, b in zip(model.cross.w, model.cross.b):
        x = x0 * (x @ w.weight.t()) + b + x
    torch.testing.assert_close(model.cross(x0), x)


def test_defaults_follow_reference_code():
    fm = TinyFeatureMap()
    emb = UniformEmbedding(fm, 64)
    deepfm = build_model("deepfm", fm, emb)
    dims = [m.out_features for m in deepfm.mlp.mlp if isinstance(m, torch.nn.Linear)]
    assert dims == [1024, 512, 256, 1]
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in deepfm.mlp.mlp)
    assert len(build_model("dcn", fm, emb).cross.w) == 6
    autoint = build_model("autoint", fm, emb)
    assert len(autoint.attention) == 3 and autoint.attention[0].num_heads == 2
    assert autoint.attention[0].w_res is not None and autoint.mlp is None
    assert build_model("autoint", fm, emb, use_mlp=True, mlp_dims=(8,)).mlp is not None
    no_bn = build_model("fnn", fm, emb, batch_norm=False, dropout=0.5, mlp_dims=(8,))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in no_bn.mlp.mlp)
    assert any(isinstance(m, torch.nn.Dropout) for m in no_bn.mlp.mlp)


def test_build_model_errors():
    fm = TinyFeatureMap()
    emb = UniformEmbedding(fm, 4)
    with pytest.raises(ValueError, match="model"):
        build_model("nope", fm, emb)
    with pytest.raises(TypeError, match="unknown model option"):
        build_model("fm", fm, emb, mlp_dimz=(3,))
    with pytest.raises(TypeError, match="cross_layers"):
        build_model("fm", fm, emb, strict=True, cross_layers=3)
    build_model("fm", fm, emb, cross_layers=3)  # other models' options are ignored when not strict
    with pytest.raises(ValueError, match="mlp_dims"):
        build_model("fnn", fm, emb, mlp_dims=(8, 0))
    with pytest.raises(ValueError, match="fields"):
        build_model("fnn", TinyFeatureMap((3, 4)), emb)
    assert "cross_layers" in model_options("dcn") and "cross_layers" not in model_options("fm")
    model = build_model("fm", fm, emb)
    with pytest.raises(ValueError, match="emb must have shape"):
        model.predict_from_embeddings(torch.zeros(2, 5, 3), random_ids(fm, 2))


def test_uniform_embedding():
    fm = TinyFeatureMap()
    emb = UniformEmbedding(fm, 8)
    assert isinstance(emb, EmbeddingModule)
    n = fm.num_features
    assert emb.num_params() == n * 8 and emb.sparsity() == 0.0 and emb.memory_bytes() == n * 8 * 4
    bound = (6.0 / (n + 8)) ** 0.5  # xavier uniform over the (N, D) table
    assert emb.weight.abs().max() <= bound and emb.weight.std() > bound / 4
    normal = UniformEmbedding(fm, 8, init="normal", init_std=1e-4)
    assert normal.weight.std() < 3e-4
    ids = random_ids(fm, 4)
    torch.testing.assert_close(emb(ids), emb.weight[ids])
    assert emb.regularization().item() == 0.0
    assert emb.param_groups(0.1, 0.0)[0]["params"] == [emb.weight]
    assert emb.sparse_parameters() == []


def test_uniform_embedding_sparse_grad():
    fm = TinyFeatureMap()
    emb = UniformEmbedding(fm, 3, sparse=True)
    assert emb.sparse_grad and emb.sparse_parameters() == [emb.weight]
    ids = random_ids(fm, 4)
    emb(ids).sum().backward()
    assert emb.weight.grad.is_sparse
    dense = torch.zeros(fm.num_features, 3).index_add_(0, ids.flatten(), torch.ones(ids.numel(), 3))
    torch.testing.assert_close(emb.weight.grad.to_dense(), dense)


def test_uniform_embedding_bad_input():
    fm = TinyFeatureMap()
    with pytest.raises(ValueError, match="embed_dim"):
        UniformEmbedding(fm, 0)
    with pytest.raises(ValueError, match="init"):
        UniformEmbedding(fm, 4, init="zeros")
    emb = UniformEmbedding(fm, 4)
    with pytest.raises(ValueError, match="ids must have shape"):
        emb(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 or int32"):
        emb(torch.zeros(3, fm.num_fields))
    with pytest.raises(IndexError, match="ids must lie"):
        emb(torch.full((1, fm.num_fields), fm.num_features))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_short_training_beats_chance(name):
    """A few epochs on planted-signal data: every model ranks clearly better than chance (AUC 0.5)."""
    from sklearn.metrics import roc_auc_score

    from optembed_ext.data import make_synthetic
    from optembed_ext.train import TrainConfig, Trainer

    data = make_synthetic(num_samples=4000, num_fields=5, vocab_sizes=[20, 15, 30, 8, 12], seed=3)
    planted = roc_auc_score(data.test.y, data.info["true_logit_test"])
    model = make(name, data.feature_map, dim=8)
    cfg = TrainConfig(epochs=4, batch_size=128, lr=5e-3, patience=None, progress=False, seed=1)
    res = Trainer(model, data, cfg).fit()
    model.eval()
    with torch.no_grad():
        auc = roc_auc_score(data.test.y, model(torch.from_numpy(data.test.X)).numpy())
    assert auc == pytest.approx(res["test_auc"], abs=1e-9)
    assert auc > 0.5 + 0.5 * (planted - 0.5), f"{name}: test AUC {auc:.3f}, planted-signal AUC {planted:.3f}"


def test_embedding_module_defaults():
    """The base-class defaults a new embedding method inherits."""

    class Halved(EmbeddingModule):  # a table of embed_dim // 2 columns, zero-padded, plus a frozen parameter
        def __init__(self, fm, dim):
            super().__init__(fm, dim)
            self.table = torch.nn.Parameter(torch.randn(fm.num_features, dim // 2))
            self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)

        def forward(self, ids):
            self.check_ids(ids)
            e = self.table[ids]
            return torch.cat([e, e.new_zeros(*e.shape[:-1], self.embed_dim - e.shape[-1])], dim=-1)

    fm = TinyFeatureMap()
    emb = Halved(fm, 6)
    n = fm.num_features
    assert emb.num_fields == 5 and emb.num_features == n and emb.dense_size() == n * 6
    assert emb.num_params() == n * 3 + 3  # default: every parameter
    assert emb.sparsity() == pytest.approx(1 - (n * 3 + 3) / (n * 6))
    assert emb.memory_bytes() == (n * 3 + 3) * 4
    assert emb.regularization().item() == 0.0 and emb.sparse_parameters() == []
    groups = emb.param_groups(0.01, 0.1)
    assert len(groups) == 1 and groups[0]["params"] == [emb.table] and groups[0]["lr"] == 0.01
    model = build_model("deepfm", fm, emb, mlp_dims=(4,))
    assert model(random_ids(fm, 3)).shape == (3,)
    with pytest.raises(ValueError, match="embed_dim"):
        Halved(fm, True)
