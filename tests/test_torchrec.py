"""TorchRec export of a searched OptEmbed table: one EmbeddingBagConfig per field (kept rows x searched dim), the
id remap in front, the backbone on top; its logits equal the compact model's, unsharded and under
DistributedModelParallel on 2 gloo ranks with TorchRec's planner choosing the sharding (free, and table-wise).

Skipped only when ``import torchrec`` fails (install: scripts/setup.sh)."""
import pytest
import torch

from optembed_ext.data import make_synthetic
from optembed_ext.export import export_compact
from optembed_ext.export.torchrec import torchrec_available

pytestmark = pytest.mark.skipif(not torchrec_available(), reason="torchrec (with fbgemm-gpu-cpu) is not importable")

MODEL_CFG = {"mlp_dims": [8]}
D = 6


def searched_model(oov: bool = False, model_name: str = "deepfm"):
    """A retrained-like masked model: random weights, some rows pruned (field 2 entirely), mixed field dims."""
    from optembed_ext.models import build_model
    from optembed_ext.nn.optembed import OptEmbedEmbedding

    fmap = make_synthetic(num_samples=50, num_fields=4, vocab_sizes=[20, 7, 13, 30], seed=1).feature_map
    torch.manual_seed(0)
    emb = OptEmbedEmbedding(fmap, D, oov=oov)
    model = build_model(model_name, fmap, emb, **MODEL_CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
        for name, b in model.named_buffers():  # batch-norm running statistics away from (0, 1)
            if name.endswith("running_mean"):
                b.uniform_(-0.2, 0.2)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    mask = torch.rand(fmap.num_features, generator=torch.Generator().manual_seed(1)) < 0.6
    start, stop = fmap.offsets[2], fmap.offsets[2] + fmap.cardinalities[2]
    mask[start:stop] = False
    emb.freeze(mask, [3, 6, 2, 1])
    return model.eval(), fmap


def random_ids(fmap, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, c, (n,), generator=g) + o for c, o in zip(fmap.cardinalities, fmap.offsets)]
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("oov", [False, True])
def test_torchrec_model_has_one_table_per_field_and_the_compact_logits(oov):
    from optembed_ext.export.torchrec import export_torchrec, table_name

    model, fmap = searched_model(oov)
    compact = export_compact(model, model_name="deepfm", model_cfg=MODEL_CFG).eval()
    trec = export_torchrec(compact)
    kept = compact.embedding.field_rows
    for f, name in enumerate(fmap.field_names):
        table = trec.sparse.embedding_bags[table_name(name)].weight
        rows = kept[f] + (1 if oov else 0)
        assert tuple(table.shape) == (max(rows, 1), 8 if f == 1 else 4)  # dims 3, 6, 2, 1 padded to 4s
        assert not table[:, [3, 6, 2, 1][f]:].any()
    ids = random_ids(fmap, 257, 3)
    with torch.no_grad():
        expected = compact(ids)
        torch.testing.assert_close(trec(ids), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(expected, model(ids), rtol=1e-5, atol=1e-5)


def test_export_from_a_saved_search_result(tmp_path):
    from optembed_ext.export.torchrec import export_torchrec
    from optembed_ext.results import RESULT_FILE, save_search_result

    model, fmap = searched_model()
    emb = model.embedding
    save_search_result(tmp_path / RESULT_FILE, row_mask=emb.row_mask(), field_dims=emb.field_dims(),
                       feature_map=fmap, model_name="deepfm", model_cfg=MODEL_CFG, embed_dim=D, norm=1, oov=False,
                       state_dict=model.state_dict(), metrics={})
    trec = export_torchrec(tmp_path)
    ids = random_ids(fmap, 64, 4)
    with torch.no_grad():
        torch.testing.assert_close(trec(ids), model(ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- DistributedModelParallel
SHARDINGS = {"planner": None, "table_wise": ["table_wise"]}


def _serve_sharded():
    import torch.distributed as dist

    from optembed_ext.export.torchrec import export_torchrec, shard_torchrec_model

    model, fmap = searched_model(oov=True)
    compact = export_compact(model, model_name="deepfm", model_cfg=MODEL_CFG).eval()
    out = {}
    for name, sharding_types in SHARDINGS.items():
        dmp, plan = shard_torchrec_model(export_torchrec(compact), sharding_types=sharding_types)
        ids = random_ids(fmap, 96 + 7 * dist.get_rank(), 10 + dist.get_rank())  # each rank its own batch
        with torch.no_grad():
            logits = dmp(ids)
            expected = compact(ids)
        out[name] = {"max_diff": float((logits - expected).abs().max()), "n": int(logits.numel()), "plan": str(plan)}
    return out


def test_sharded_torchrec_model_serves_the_compact_logits_on_two_ranks(tmp_path):
    from test_distributed import run_ranks

    ranks = run_ranks(_serve_sharded, (), tmp_path)
    for name in SHARDINGS:
        assert [r[name]["n"] for r in ranks] == [96, 103]
        for r in ranks:
            assert r[name]["max_diff"] <= 1e-5, (name, r[name])
    # table-wise: each table on one rank (TorchRec shards row-wise on CUDA only)
    plan = ranks[0]["table_wise"]["plan"]
    assert "table_wise" in plan and "data_parallel" not in plan
