"""Inference export: a network that reads only the kept dims (sliced first layers, interactions on shared dims,
dropped fields) predicts what the masked model predicts, for every backbone."""
import pytest
import torch

from optembed_ext.data import batches, make_synthetic
from optembed_ext.export.inference import (SUPPORTED, InferenceCTRModel, compare_inference, export_inference,
                                           inference_from_model)
from optembed_ext.models import MODELS, build_model
from optembed_ext.nn.optembed import OptEmbedEmbedding
from optembed_ext.nn.uniform import UniformEmbedding

D = 8
CARDS = [13, 7, 29, 5, 11, 3, 9]
MODEL_CFG = {"mlp_dims": [16, 8], "cross_layers": 2, "attention_layers": 2, "num_heads": 2, "dropout": 0.0}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_samples=512, num_fields=len(CARDS), vocab_sizes=CARDS, seed=4)


def _masked_model(name, data, *, oov, dims, seed=0, **cfg):
    """OptEmbed table with frozen masks -- field 1 pruned entirely (all rows: dropped unless it has an OOV vector),
    several widths, two fields sharing a width -- after a few training steps (batch-norm statistics not at their start)."""
    torch.manual_seed(seed)
    fmap = data.feature_map
    model = build_model(name, fmap, OptEmbedEmbedding(fmap, D, oov=oov), **{**MODEL_CFG, **cfg})
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(fmap.num_features, generator=gen) < 0.6
    lo, hi = fmap.offsets[1], fmap.offsets[1] + fmap.cardinalities[1]
    mask[lo:hi] = False
    model.embedding.freeze(mask, dims)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step, (ids, y) in enumerate(batches(data.train, 128, shuffle=True, seed=seed)):
        if step == 3:
            break
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if hasattr(model, "cross"):  # non-zero cross biases, so the padded coordinates carry constants
        with torch.no_grad():
            for b in model.cross.b:
                b.normal_()
    return model.eval()


@pytest.mark.parametrize("oov", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_equal_the_masked_model(data, name, oov):
    assert name in SUPPORTED
    dims = [3, 4, D, 3, 5, 2, 1]
    masked = _masked_model(name, data, oov=oov, dims=dims)
    fast = inference_from_model(masked)
    ids = torch.as_tensor(data.test.X[:200])
    with torch.no_grad():
        expected = masked(ids)
    torch.testing.assert_close(fast(ids), expected, rtol=1e-4, atol=1e-4)
    kept = [d for f, d in enumerate(dims) if oov or f != 1]
    assert fast.kept_width == sum(kept)
    assert (fast.field_dims[1] == 0) == (not oov)


def test_autoint_plus_and_dcn_without_deep_part(data):
    dims = [2, 4, D, 3, 5, 2, 1]
    for name, cfg in (("autoint", {"use_mlp": True}), ("dcn", {"mlp_dims": []})):
        masked = _masked_model(name, data, oov=False, dims=dims, **cfg)
        ids = torch.as_tensor(data.test.X[:64])
        with torch.no_grad():
            expected = masked(ids)
        torch.testing.assert_close(inference_from_model(masked)(ids), expected, rtol=1e-4, atol=1e-4)


def test_uniform_source_and_latency_report(data):
    torch.manual_seed(1)
    model = build_model("deepfm", data.feature_map, UniformEmbedding(data.feature_map, D), **MODEL_CFG).eval()
    fast = export_inference(model)
    ids = torch.as_tensor(data.test.X[:32])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-4, atol=1e-4)
    assert isinstance(fast, InferenceCTRModel) and fast.kept_width == len(CARDS) * D
    report = compare_inference(fast, {"uniform": model}, ids, repeats=2, warmup=1)
    assert report["inference"]["samples_per_s"] > 0 and "speedup_vs_uniform" in report
    assert report["input_width"] == {"inference": len(CARDS) * D, "full": len(CARDS) * D}


def test_bad_arguments(data):
    masked = _masked_model("fm", data, oov=False, dims=[1] * len(CARDS))
    with pytest.raises(ValueError, match="field_dims has 2 entries"):
        inference_from_model(masked, field_dims=[1, 2])
    with pytest.raises(ValueError, match="supports the backbones"):
        inference_from_model(masked, model_name="nope")
    with pytest.raises(ValueError, match=r"ids must have shape"):
        inference_from_model(masked)(torch.zeros(3, 2, dtype=torch.long))
