"""Inference of a searched model: the uniform model, the masked model, the compact export and the inference export
(:mod:`optembed_ext.export.inference`, a network that reads only the kept dims) on one evaluation batch.

Synthetic search result at the benchmark shape: an OptEmbed table with a frozen row mask (about 55 % of the rows
kept) and per-field dims drawn from {8, 16, 24, 32, 48, 64} (seeded), so the network's input width is about half of
``F * D``; backbones DeepFM and DCN (MLP 1024-512-256 with batch norm at Criteo scale, 64-32 on the small shape),
evaluation batch 4096 (Criteo) / 256 (small), ``model.eval()`` under ``torch.no_grad()``.

Implementations (baseline first): ``uniform`` (the same backbone around a full ``(N, D)`` table), ``masked`` (the
searched model as trained), ``compact`` (:func:`optembed_ext.export.export_compact`), ``inference``
(:func:`optembed_ext.export.export_inference`). Every implementation's logits are checked against the masked model
before timing (the uniform model has random values and is only timed). Throughput in samples/s; the case name
carries the input width of the inference network against ``F * D``.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import DEVICES, Shape, make_ids, run_case, shape_params
from optembed_ext.data import FeatureMap
from optembed_ext.export import export_compact, export_inference
from optembed_ext.models import build_model
from optembed_ext.nn.optembed import OptEmbedEmbedding
from optembed_ext.nn.uniform import UniformEmbedding

SUITE = "inference_export"
IMPLS = ("uniform", "masked", "compact", "inference")  # baseline first
DIM_CHOICES = (8, 16, 24, 32, 48, 64)
_CACHE: dict = {}


def eval_batch(shape: Shape) -> int:
    return 4096 if shape.name.startswith("criteo") else 256


def build(shape: Shape, model_name: str, device):
    key = (shape.name, model_name, str(device))
    if key in _CACHE:
        return _CACHE[key]
    _CACHE.clear()  # one (N, D) table at a time
    fmap = FeatureMap("bench", [f"f{i}" for i in range(shape.fields)], shape.cardinalities())
    torch.manual_seed(0)
    mlp = (1024, 512, 256) if shape.name.startswith("criteo") else (64, 32)
    cfg = {"mlp_dims": mlp, "cross_layers": 3}
    emb = OptEmbedEmbedding(fmap, shape.dim)
    masked = build_model(model_name, fmap, emb, **cfg)
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(fmap.num_features, generator=gen) < 0.55
    choices = [d for d in DIM_CHOICES if d <= shape.dim] or [shape.dim]
    dims = [choices[int(i)] for i in torch.randint(0, len(choices), (shape.fields,), generator=gen)]
    emb.freeze(mask, dims)
    masked = masked.to(device).eval()
    uniform = copy.deepcopy(masked)
    uniform.embedding = UniformEmbedding(fmap, shape.dim).to(device)
    models = {"uniform": uniform.eval(), "masked": masked,
              "compact": export_compact(masked, model_cfg=cfg).eval(), "inference": export_inference(masked)}
    _CACHE[key] = (models, sum(dims))
    return _CACHE[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_name", ["deepfm", "dcn"])
@pytest.mark.parametrize("shape", shape_params())
@pytest.mark.parametrize("device", DEVICES)
def test_inference_export(benchmark, request, device, shape, model_name, impl):
    models, width = build(shape, model_name, device)
    batch = eval_batch(shape)
    ids = make_ids(Shape(shape.name, batch, shape.fields, shape.dim, shape.rows), "zipf", device)
    model = models[impl]
    if impl != "uniform":
        with torch.no_grad():
            torch.testing.assert_close(model(ids), models["masked"](ids), rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{impl} logits vs the masked model: {m}")

    def fn():
        with torch.no_grad():
            return model(ids)

    fn()
    case = f"eval {model_name} {shape.name} (input width {width} of {shape.fields * shape.dim})"
    run_case(benchmark, request, fn, suite=SUITE, case=case, device=device, impl=impl, baseline="uniform",
             items=batch, item_name="samples")
