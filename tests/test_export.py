"""Compact export of a searched (row- and dim-masked) model: same predictions, smaller tables, save / load, CLI."""
import json

import pytest
import torch

from optembed_ext import _ext, ops
from optembed_ext.data import batches, make_synthetic
from optembed_ext.export import (
    CompactCTRModel,
    compact_from_model,
    compare_with_uniform,
    export_compact,
    load_compact,
    save_compact,
    uniform_memory_bytes,
)
from optembed_ext.models import MODELS, build_model
from optembed_ext.nn.compact import CompactEmbedding
from optembed_ext.nn.optembed import OptEmbedEmbedding
from optembed_ext.nn.uniform import UniformEmbedding

D = 8
CARDS = [13, 7, 29, 5, 11, 3]
MODEL_CFG = {"mlp_dims": [16, 8], "cross_layers": 2, "attention_layers": 2, "num_heads": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_samples=512, num_fields=len(CARDS), vocab_sizes=CARDS, seed=3)


def _masks(fmap, seed=0):
    """A row mask with some rows pruned in every field and field 1 pruned entirely; dims < D in most fields."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(fmap.num_features, generator=gen) < 0.55
    lo, hi = fmap.offsets[1], fmap.offsets[1] + fmap.cardinalities[1]
    mask[lo:hi] = False
    for f, (o, c) in enumerate(zip(fmap.offsets, fmap.cardinalities)):
        if f != 1:
            mask[o] = True  # at least one kept ...
            mask[o + c - 1] = False  # ... and one pruned row per field
    dims = [3, 1, D, 5, 2, 7]
    return mask, dims


def _masked_model(name, data, *, oov=False, seed=0, steps=3):
    """A retrained-style masked model: OptEmbed table with frozen (m_e, m_d), a few training steps taken so the
    backbone (batch-norm statistics included) is not at its initial state."""
    torch.manual_seed(seed)
    fmap = data.feature_map
    model = build_model(name, fmap, OptEmbedEmbedding(fmap, D, oov=oov), **MODEL_CFG)
    mask, dims = _masks(fmap, seed)
    model.embedding.freeze(mask, dims)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step, (ids, y) in enumerate(batches(data.train, 128, shuffle=True, seed=seed)):
        if step == steps:
            break
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _test_ids(data, n=200):
    return torch.as_tensor(data.test.X[:n])


def _expected_bytes(fmap, mask, dims, *, oov=False, remap_itemsize=4, itemsize=4):
    """From the definition: kept rows x field dim values, one remap entry per id, (F+1) offsets and F dims as
    int64, and the (F, D) OOV vectors when present."""
    F = fmap.num_fields
    values = 0
    for f, (o, c) in enumerate(zip(fmap.offsets, fmap.cardinalities)):
        values += int(mask[o:o + c].sum()) * dims[f]
    return (values * itemsize + fmap.num_features * remap_itemsize + (2 * F + 1) * 8
            + (F * D * itemsize if oov else 0))


# ------------------------------------------------------------------------------------ same predictions
@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_matches_masked_model(data, name):
    masked = _masked_model(name, data)
    compact = compact_from_model(masked, model_name=name, model_cfg=MODEL_CFG).eval()
    ids = _test_ids(data)
    with torch.no_grad():
        # The embedding tensor the backbone sees is the same, value for value ...
        assert torch.equal(compact.embedding(ids), masked.embedding(ids))
        # ... so the predictions agree.
        torch.testing.assert_close(compact(ids), masked(ids), rtol=1e-6, atol=1e-6)
    # The compact table holds only the kept rows at their field dims.
    mask, dims = _masks(data.feature_map)
    emb = compact.embedding
    assert isinstance(emb, CompactEmbedding)
    for f, (o, c) in enumerate(zip(data.feature_map.offsets, data.feature_map.cardinalities)):
        assert emb.field_rows[f] == int(mask[o:o + c].sum())
        assert emb.table(f).shape == (emb.field_rows[f], dims[f])
    assert emb.field_rows[1] == 0


def test_export_on_device(data, device, tmp_path):
    """Export of a model living on ``device``: the compact model stays there and reloads there."""
    masked = _masked_model("deepfm", data, oov=True).to(device)
    compact = compact_from_model(masked, model_name="deepfm", model_cfg=MODEL_CFG).eval()
    assert compact.embedding.packed.device.type == device.type
    ids = _test_ids(data).to(device)
    loaded = load_compact(save_compact(compact, tmp_path / "m.pt"), map_location=device)
    assert loaded.embedding.remap.device.type == device.type
    with torch.no_grad():
        want = masked(ids)
        torch.testing.assert_close(compact(ids), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["deepfm", "autoint"])
def test_export_with_oov_vectors(data, name):
    masked = _masked_model(name, data, oov=True, seed=1)
    compact = compact_from_model(masked, model_name=name, model_cfg=MODEL_CFG).eval()
    ids = _test_ids(data)
    pruned = ~masked.embedding.fixed_row_mask[ids]
    assert pruned.any()
    with torch.no_grad():
        emb = compact.embedding(ids)
        assert torch.equal(emb, masked.embedding(ids))
        # Pruned ids are served the field's OOV vector, cut to the field's dim (not zeros).
        f = int(pruned.nonzero()[0, 1])
        d = masked.embedding.field_dims()[f]
        b = int(pruned[:, f].nonzero()[0, 0])
        assert torch.equal(emb[b, f, :d], masked.embedding.oov_weight[f, :d])
        torch.testing.assert_close(compact(ids), masked(ids), rtol=1e-6, atol=1e-6)
    assert compact.embedding.memory_bytes() == _expected_bytes(data.feature_map, *_masks(data.feature_map, 1),
                                                               oov=True)


def test_export_of_supernet_uses_threshold_mask(data):
    """An unfrozen OptEmbed table: the row mask comes from the thresholds (||w||_1 > t_f)."""
    torch.manual_seed(0)
    fmap = data.feature_map
    model = build_model("fnn", fmap, OptEmbedEmbedding(fmap, D, oov=True), **MODEL_CFG).eval()
    with torch.no_grad():
        norms = model.embedding.weight.abs().sum(1)
        # Thresholds halfway between two sorted norms of each field: no ties, whatever the summation order.
        cuts = []
        for o, c in zip(fmap.offsets, fmap.cardinalities):
            s = norms[o:o + c].sort().values
            cuts.append(float(s[c // 2 - 1] + s[c // 2]) / 2 if c > 1 else float(s[0]) - 1.0)
        model.embedding.threshold.copy_(torch.tensor(cuts))
    compact = compact_from_model(model, model_name="fnn", model_cfg=MODEL_CFG).eval()
    expected_rows = [int((norms[o:o + c] > model.embedding.threshold[f]).sum())
                     for f, (o, c) in enumerate(zip(fmap.offsets, fmap.cardinalities))]
    assert compact.embedding.field_rows == expected_rows
    assert sum(expected_rows) < fmap.num_features
    ids = _test_ids(data)
    with torch.no_grad():
        torch.testing.assert_close(compact(ids), model(ids), rtol=1e-6, atol=1e-6)


def test_export_of_uniform_model_keeps_everything(data):
    torch.manual_seed(0)
    fmap = data.feature_map
    model = build_model("dcn", fmap, UniformEmbedding(fmap, D), **MODEL_CFG).eval()
    compact = compact_from_model(model, model_name="dcn", model_cfg=MODEL_CFG).eval()
    assert compact.embedding.field_rows == list(fmap.cardinalities)
    assert torch.equal(compact.embedding.to_dense(), model.embedding.weight.detach())
    ids = _test_ids(data)
    with torch.no_grad():
        torch.testing.assert_close(compact(ids), model(ids), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not _ext.HAS_EXTENSION or ops.use_reference(),
                    reason="fullgraph compile needs the compiled op (the reference checks ids with a host sync)")
def test_compiled_compact_model(data):
    torch._dynamo.reset()
    masked = _masked_model("fnn", data, steps=0)
    compact = compact_from_model(masked, model_name="fnn", model_cfg=MODEL_CFG).eval()
    ids = _test_ids(data, 32)
    compiled = torch.compile(compact, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), masked(ids), rtol=1e-6, atol=1e-6)


def test_fine_tuning_gradient_matches_masked_table(data):
    """The compact table's gradient is the masked table's gradient at the kept rows and dims."""
    masked = _masked_model("wd", data, steps=0)
    compact = compact_from_model(masked, model_name="wd", model_cfg=MODEL_CFG).eval()
    ids = _test_ids(data, 64)
    masked.embedding.weight.grad = None
    masked(ids).sum().backward()
    compact(ids).sum().backward()
    mask, dims = _masks(data.feature_map)
    g = masked.embedding.weight.grad
    blocks = []
    for f, (o, c) in enumerate(zip(data.feature_map.offsets, data.feature_map.cardinalities)):
        rows = torch.arange(o, o + c)[mask[o:o + c]]
        blocks.append(g[rows, :dims[f]].reshape(-1))
    torch.testing.assert_close(compact.embedding.packed.grad, torch.cat(blocks), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("remap_dtype,remap_itemsize", [(torch.int32, 4), (torch.int64, 8)])
def test_memory_bytes_exact_and_smaller(data, remap_dtype, remap_itemsize):
    masked = _masked_model("fm", data, steps=0)
    compact = compact_from_model(masked, model_name="fm", model_cfg=MODEL_CFG, remap_dtype=remap_dtype)
    mask, dims = _masks(data.feature_map)
    want = _expected_bytes(data.feature_map, mask, dims, remap_itemsize=remap_itemsize)
    emb = compact.embedding
    assert emb.memory_bytes() == want
    assert sum(emb.memory_breakdown().values()) == want
    uniform = data.feature_map.num_features * D * 4
    assert uniform_memory_bytes(data.feature_map, D) == uniform
    assert emb.memory_bytes() < uniform
    # The stored table is exactly the kept values.
    assert emb.packed.numel() == sum(int(mask[o:o + c].sum()) * dims[f] for f, (o, c) in
                                     enumerate(zip(data.feature_map.offsets, data.feature_map.cardinalities)))


def test_compare_with_uniform_reports_memory_and_latency(data):
    masked = _masked_model("deepfm", data, steps=0)
    compact = compact_from_model(masked, model_name="deepfm", model_cfg=MODEL_CFG).eval()
    rep = compare_with_uniform(compact, masked_model=masked, batch_size=64, repeats=2, warmup=1)
    assert rep["memory"]["uniform_bytes"] == data.feature_map.num_features * D * 4
    assert rep["memory"]["compact_bytes"] == compact.embedding.memory_bytes()
    assert rep["memory"]["compression_ratio"] > 1
    for key in ("uniform", "compact", "masked"):
        assert rep["latency"][key]["median_ms"] > 0
    assert rep["max_abs_logit_diff_vs_masked"] <= 1e-5
    json.dumps(rep)  # JSON-able


# ------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("oov", [False, True])
def test_save_load_round_trip(data, tmp_path, oov):
    masked = _masked_model("dcn", data, oov=oov, seed=2)
    compact = compact_from_model(masked, model_name="dcn", model_cfg=MODEL_CFG).eval()
    path = save_compact(compact, tmp_path / "sub" / "model.pt")
    # A plain torch file: tensors and builtin types only.
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "optembed-compact"
    state = payload["state_dict"]
    assert state["model.embedding.packed"].numel() == compact.embedding.packed.numel()
    assert "model.embedding.weight" not in state  # the full table is not stored
    loaded = load_compact(path)
    assert isinstance(loaded, CompactCTRModel) and not loaded.training
    ids = _test_ids(data)
    with torch.no_grad():
        assert torch.equal(loaded(ids), compact(ids))
        torch.testing.assert_close(loaded(ids), masked(ids), rtol=1e-6, atol=1e-6)
    assert loaded.embedding.memory_bytes() == compact.embedding.memory_bytes()
    # The state dict alone also restores a model built from the config.
    fresh = CompactCTRModel.from_config(compact.config())
    fresh.load_state_dict(compact.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), compact(ids))


def test_load_rejects_other_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="optembed-compact"):
        load_compact(tmp_path / "x.pt")


# ------------------------------------------------------------------------------------------- bad inputs
def test_export_rejects_unsupported_tables(data):
    from optembed_ext.nn.qr import QREmbedding

    fmap = data.feature_map
    model = build_model("fnn", fmap, QREmbedding(fmap, D), **MODEL_CFG)
    with pytest.raises(TypeError, match="QREmbedding"):
        compact_from_model(model, model_name="fnn", model_cfg=MODEL_CFG)


def test_export_rejects_mismatched_backbone_config(data):
    masked = _masked_model("fnn", data, steps=0)
    with pytest.raises(ValueError, match="model_cfg"):
        compact_from_model(masked, model_name="fnn", model_cfg={"mlp_dims": [4]})


def test_compact_embedding_bad_arguments(data):
    fmap = data.feature_map
    F = fmap.num_fields
    with pytest.raises(ValueError, match="field_dims"):
        CompactEmbedding(fmap, D, [1] * F, [D + 1] * F)
    with pytest.raises(ValueError, match="field_rows"):
        CompactEmbedding(fmap, D, [10_000] * F, [1] * F)
    with pytest.raises(ValueError, match="field_dims"):
        CompactEmbedding(fmap, D, [1] * F, [1] * (F - 1))
    with pytest.raises(ValueError, match="row_mask"):
        CompactEmbedding.from_table(fmap, torch.zeros(fmap.num_features, D), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="weight"):
        CompactEmbedding.from_table(fmap, torch.zeros(fmap.num_features + 1, D))
    emb = CompactEmbedding.from_table(fmap, torch.randn(fmap.num_features, D))
    with pytest.raises((ValueError, IndexError, RuntimeError), match="ids|indices"):
        emb(torch.zeros(4, F - 1, dtype=torch.long))
    with pytest.raises((ValueError, IndexError, RuntimeError), match="indices"):
        emb(torch.full((4, F), fmap.num_features, dtype=torch.long))


# ------------------------------------------------------------------------------- search result and CLI
def _fake_run(tmp_path, data, name="deepfm", oov=False):
    """A run folder holding what a finished `optembed search` saves for export (optembed_result.pt)."""
    masked = _masked_model(name, data, oov=oov)
    fmap = data.feature_map
    mask, dims = _masks(fmap)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "optembed-result/1", "row_mask": mask, "field_dims": dims,
                "kept_rows_per_field": [int(mask[o:o + c].sum()) for o, c in zip(fmap.offsets, fmap.cardinalities)],
                "feature_map": fmap.to_dict(), "model_name": name, "model_cfg": dict(MODEL_CFG), "embed_dim": D,
                "norm": 1, "oov": oov, "state_dict": masked.state_dict(), "metrics": {}},
               run / "optembed_result.pt")
    return run, masked


def test_export_from_run_folder(data, tmp_path):
    run, masked = _fake_run(tmp_path, data, oov=True)
    compact = export_compact(run).eval()
    ids = _test_ids(data)
    with torch.no_grad():
        torch.testing.assert_close(compact(ids), masked(ids), rtol=1e-6, atol=1e-6)


def test_cli_export(data, tmp_path):
    from optembed_ext.cli import main

    run, masked = _fake_run(tmp_path, data)
    out = tmp_path / "exported" / "compact.pt"
    assert main(["export", "--run", str(run), "--out", str(out), "--batch-size", "256", "--repeats", "2"]) == 0
    loaded = load_compact(out)
    ids = _test_ids(data)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), masked(ids), rtol=1e-6, atol=1e-6)
    report = json.loads(out.with_name(out.name + ".json").read_text())
    assert report["latency"]["compact"]["batch_size"] == 256
    mask, dims = _masks(data.feature_map)
    assert report["memory"]["compact_bytes"] == _expected_bytes(data.feature_map, mask, dims)
    assert report["memory"]["uniform_bytes"] == data.feature_map.num_features * D * 4
    assert report["max_abs_logit_diff_vs_masked"] <= 1e-5


@pytest.mark.slow
def test_end_to_end_tiny_search_then_export(tmp_path):
    """A real (tiny) OptEmbed run, then export: the exported model reproduces the retrained model."""
    from optembed_ext.search.optembed import build_retrained_model, load_search_result, run_optembed

    data = make_synthetic(num_samples=400, num_fields=4, vocab_sizes=[9, 5, 17, 6], seed=0)
    cfg = {"embed_dim": 4, "model_cfg": {"mlp_dims": [8]}, "epochs": 1, "batch_size": 128, "generations": 1,
           "mutation_num": 2, "crossover_num": 2, "measure_speedup": False, "baseline": False,
           "threshold_init": 0.5}
    run_optembed(data, "fnn", cfg, tmp_path / "run", log=None)
    result = load_search_result(tmp_path / "run")
    masked = build_retrained_model(result).eval()
    compact = export_compact(tmp_path / "run").eval()
    ids = _test_ids(data)
    with torch.no_grad():
        torch.testing.assert_close(compact(ids), masked(ids), rtol=1e-6, atol=1e-6)
    assert compact.embedding.field_rows == [int(x) for x in result["kept_rows_per_field"]]
    # The pipeline exports the retrained model itself, with its size next to the uniform model's.
    report = json.loads((tmp_path / "run" / "compact_model.pt.json").read_text())
    assert report["memory"]["compact_bytes"] == compact.embedding.memory_bytes()
    assert report["memory"]["uniform_bytes"] == data.feature_map.num_features * 4 * 4
    with torch.no_grad():
        torch.testing.assert_close(load_compact(tmp_path / "run" / "compact_model.pt")(ids), masked(ids),
                                   rtol=1e-6, atol=1e-6)
    # And through the command line, without the latency comparison.
    from optembed_ext.cli import main

    out = tmp_path / "cli" / "model.pt"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out), "--no-benchmark"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_compact(out)(ids), masked(ids), rtol=1e-6, atol=1e-6)
    assert "latency" not in json.loads(out.with_name(out.name + ".json").read_text())
