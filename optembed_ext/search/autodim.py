"""AutoDim search schedule: DARTS-style architecture steps on validation batches, then retraining.

Search: an :class:`~optembed_ext.nn.autodim.AutoDimEmbedding` supernet is trained by the shared trainer; its
architecture weights ``alpha`` are left out of the trainer's optimizer and updated by
:class:`~optembed_ext.search.darts.DartsArchitectureCallback` (first- or second-order DARTS on validation
batches, temperature ``max(min_temperature, 1 - temperature_decay * step)``; paper: ``max(0.01, 1 - 5e-5 t)``).
After the search, every field gets its argmax candidate dimension and a
:class:`~optembed_ext.nn.autodim.MixedDimEmbedding` with those dimensions is trained from scratch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..nn.autodim import DEFAULT_CANDIDATES, TRANSFORMS, AutoDimEmbedding, MixedDimEmbedding
from ..results import MethodResult
from .base import Method, register_method
from .common import RunSettings, dataclass_from_dict, make_row, method_train_config, seed_everything, train_and_evaluate
from .darts import DartsArchitectureCallback, temperature_at  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


@dataclass
class AutoDimConfig:
    """Settings of an AutoDim run (search + retraining)."""

    candidates: list[int] = field(default_factory=lambda: list(DEFAULT_CANDIDATES))
    transform: str = "linear"                # or "zero_pad"
    batch_norm: bool = True
    arch_lr: float = 1e-3
    arch_weight_decay: float = 0.0
    arch_every: int = 1
    temperature_decay: float = 5e-5
    min_temperature: float = 0.01
    second_order: bool = False
    search_epochs: int | None = None         # None: the training epochs
    weight_sharing: bool = True              # False: one table per candidate (the paper's separate embeddings)
    retrain: bool = True

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if isinstance(self.candidates, int):
            self.candidates = [self.candidates]
        self.candidates = [int(c) for c in self.candidates]
        if not self.candidates or any(c < 1 for c in self.candidates):
            raise ValueError(f"candidates must be positive ints, got {self.candidates!r}")
        if self.search_epochs is not None and (not isinstance(self.search_epochs, int) or self.search_epochs < 1):
            raise ValueError(f"search_epochs must be a positive int or None, got {self.search_epochs!r}")


def search_autodim(data, model_name: str, embed_dim: int, train_config, config: AutoDimConfig | None = None, *,
                   model_cfg: dict | None = None, run_dir=None) -> dict:
    """Run the AutoDim search only. Returns ``{"dims", "probabilities", "candidates", "seconds", ...}``."""
    config = config or AutoDimConfig()
    seed_everything(train_config.seed)
    emb = AutoDim(config).build_embedding(data.feature_map, embed_dim)
    cb = DartsArchitectureCallback(emb, arch_lr=config.arch_lr, arch_weight_decay=config.arch_weight_decay,
                                   arch_every=config.arch_every, temperature_decay=config.temperature_decay,
                                   min_temperature=config.min_temperature, second_order=config.second_order)
    cfg = method_train_config(train_config, epochs=config.search_epochs)
    t0 = time.perf_counter()
    _, res = train_and_evaluate(data, model_name, emb, cfg, model_cfg=model_cfg, run_dir=run_dir, callbacks=[cb])
    wall = time.perf_counter() - t0
    seconds = float(res["train_seconds"])  # training epochs of the search, architecture steps included
    dims = emb.chosen_dims()
    log.info("AutoDim: chosen dimensions %s", dict(zip(data.feature_map.field_names, dims)))
    return {"dims": dims, "candidates": emb.candidates, "probabilities": emb.probabilities().tolist(),
            "alpha": emb.alpha.detach().tolist(), "seconds": seconds, "wall_seconds": wall,
            "arch_steps": cb.arch_steps,
            "supernet_test_auc": res["auc"], "field_names": list(data.feature_map.field_names)}


def run_autodim(data, model_name: str, embed_dim: int, train_config, config: AutoDimConfig | None = None, *,
                model_cfg: dict | None = None, run_dir=None) -> dict:
    """Search, then retrain with the chosen dimension per field. Returns ``{"rows": [...], "search": {...}}``."""
    config = config or AutoDimConfig()
    run_dir = Path(run_dir) if run_dir is not None else None
    search = search_autodim(data, model_name, embed_dim, train_config, config, model_cfg=model_cfg,
                            run_dir=run_dir / "search" if run_dir is not None else None)
    rows = []
    if config.retrain:
        seed_everything(train_config.seed)
        emb = MixedDimEmbedding(data.feature_map, embed_dim, search["dims"], transform=config.transform)
        _, res = train_and_evaluate(data, model_name, emb, train_config, model_cfg=model_cfg,
                                    run_dir=run_dir / "retrain" if run_dir is not None else None)
        res["train_seconds"] += search["seconds"]
        rows.append(make_row("autodim", config.transform, res, search_seconds=search["seconds"],
                             dims=search["dims"]))
    return {"rows": rows, "search": search}


def autodim_config_from_dict(values: dict) -> AutoDimConfig:
    return dataclass_from_dict(AutoDimConfig, values, "AutoDim")


@register_method
class AutoDim(Method):
    """AutoDim (Zhao et al., WWW 2021) on the shared trainer: :func:`run_autodim`."""

    name = "autodim"
    title = "AutoDim"
    config_class = AutoDimConfig
    help = "AutoDim: Gumbel-softmax dimension search with DARTS steps on validation data, then retraining"

    def build_embedding(self, feature_map, embed_dim: int) -> AutoDimEmbedding:
        c = self.config
        return AutoDimEmbedding(feature_map, embed_dim, candidates=c.candidates, transform=c.transform,
                                batch_norm=c.batch_norm, weight_sharing=c.weight_sharing)

    def run(self, data, model_name: str, settings: RunSettings, run_dir=None) -> MethodResult:
        return MethodResult.from_dict(run_autodim(data, model_name, settings.embed_dim, settings.train, self.config,
                                                  model_cfg=settings.model_cfg, run_dir=run_dir))
