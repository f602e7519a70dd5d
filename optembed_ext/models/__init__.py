"""CTR backbones. Each takes ``(B, F)`` global ids and returns logits ``(B,)``; the embedding layer is injected, so
every embedding method plugs into every model.

>>> model = build_model("deepfm", feature_map, UniformEmbedding(feature_map, 16), mlp_dims=(64, 32))
"""
from __future__ import annotations

import inspect

from .autoint import AutoInt
from .base import CTRModel
from .dcn import DCN
from .dnn import FNN, IPNN, WideDeep
from .fm import FM, DeepFM
from .layers import MLP, CrossNetwork, FeaturesLinear, InnerProduct, MultiHeadSelfAttention, fm_interaction

MODELS: dict[str, type[CTRModel]] = {
    "fm": FM,
    "deepfm": DeepFM,
    "dcn": DCN,
    "fnn": FNN,
    "ipnn": IPNN,
    "wd": WideDeep,
    "autoint": AutoInt,
}


def model_options(name: str) -> set[str]:
    """Keyword options accepted by model ``name`` (besides feature_map and embedding)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    params = inspect.signature(MODELS[name].__init__).parameters
    return {p for p in params if p not in ("self", "feature_map", "embedding")}


def _all_options() -> set[str]:
    return set().union(*(model_options(n) for n in MODELS))


def build_model(name: str, feature_map, embedding, *, strict: bool = False, **cfg) -> CTRModel:
    """Build model ``name`` (a key of :data:`MODELS`) around ``embedding``.

    ``cfg`` holds model options (``mlp_dims``, ``dropout``, ``batch_norm``, ``cross_layers``, ``attention_layers``,
    ``num_heads``, ``attention_dim``, ``residual``, ``use_scale``, ``use_mlp``). Options that belong to another
    model (e.g. ``cross_layers`` for ``fm``) are ignored unless ``strict``; options no model knows raise TypeError.
    """
    accepted = model_options(name)
    unknown = set(cfg) - _all_options()
    if unknown:
        raise TypeError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(_all_options())}")
    if strict and set(cfg) - accepted:
        raise TypeError(f"model {name!r} does not take option(s) {sorted(set(cfg) - accepted)}")
    kwargs = {k: v for k, v in cfg.items() if k in accepted}
    if "mlp_dims" in kwargs and kwargs["mlp_dims"] is not None:
        kwargs["mlp_dims"] = tuple(kwargs["mlp_dims"])
    return MODELS[name](feature_map, embedding, **kwargs)


__all__ = [
    "MODELS", "build_model", "model_options", "CTRModel", "FM", "DeepFM", "DCN", "FNN", "IPNN", "WideDeep",
    "AutoInt", "MLP", "CrossNetwork", "FeaturesLinear", "InnerProduct", "MultiHeadSelfAttention", "fm_interaction",
]
