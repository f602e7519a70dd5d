"""AutoField search schedule: field gates trained on validation batches, keep the top fields, retrain.

Search: an :class:`~optembed_ext.nn.autofield.AutoFieldEmbedding` (full table, per-field Gumbel keep/drop
gate) is trained by the shared trainer while :class:`~optembed_ext.search.darts.DartsArchitectureCallback`
updates the gate logits on ``trainer.next_val_batch()`` (first-order DARTS) and anneals the temperature.

Selection and retraining: the ``keep`` fields with the highest keep probability are kept (``keep`` is a
count, or a fraction of the fields when below 1) and a :class:`~optembed_ext.nn.autofield.FieldSelectedEmbedding`
is trained from scratch. With ``remove_fields`` (default, the paper's feature-field selection) dropped fields are
removed from the data -- their ids are replaced by the field's first id in every split, so no part of the model
(first-order terms included) can read them. Without it only their embeddings are removed: backbones with
first-order terms (FM, DeepFM, Wide&Deep) still read their ids there, exactly as during the search, where the
gates scale the embeddings only.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..nn.autofield import AutoFieldEmbedding, FieldSelectedEmbedding
from ..results import MethodResult
from .base import Method, register_method
from .common import RunSettings, dataclass_from_dict, make_row, method_train_config, seed_everything, train_and_evaluate
from .darts import DartsArchitectureCallback

log = logging.getLogger(__name__)


@dataclass
class AutoFieldConfig:
    """Settings of an AutoField run (search + retraining)."""

    keep: float = 0.5                        # fields kept: a count (>= 1) or a fraction of the fields (< 1)
    arch_lr: float = 1e-3
    arch_weight_decay: float = 0.0
    arch_every: int = 1
    temperature_decay: float = 5e-5
    min_temperature: float = 0.01
    second_order: bool = False
    search_epochs: int | None = None
    retrain: bool = True
    remove_fields: bool = True               # False: drop only the embeddings of the fields not kept

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not self.keep > 0:
            raise ValueError(f"keep must be a positive count or a fraction in (0, 1), got {self.keep!r}")
        if self.keep >= 1 and float(self.keep) != int(self.keep):
            raise ValueError(f"keep must be an integer count when >= 1, got {self.keep!r}")
        if self.search_epochs is not None and (not isinstance(self.search_epochs, int) or self.search_epochs < 1):
            raise ValueError(f"search_epochs must be a positive int or None, got {self.search_epochs!r}")

    def num_kept(self, num_fields: int) -> int:
        if self.keep >= 1:
            k = int(self.keep)
        else:
            k = int(math.ceil(self.keep * num_fields))
        return max(1, min(num_fields, k))


def drop_fields(data, keep):
    """A copy of ``data`` whose fields not in ``keep`` carry no information (every id set to the field's first id)."""
    keep = set(int(k) for k in keep)
    offsets = data.feature_map.offsets
    dropped = [f for f in range(data.feature_map.num_fields) if f not in keep]

    def fix(split):
        X = np.array(split.X, copy=True)
        for f in dropped:
            X[:, f] = offsets[f]
        return dataclasses.replace(split, X=X, y=split.y)

    info = dict(data.info)
    info["dropped_fields"] = [data.feature_map.field_names[f] for f in dropped]
    return dataclasses.replace(data, train=fix(data.train), val=fix(data.val), test=fix(data.test), info=info)


def search_autofield(data, model_name: str, embed_dim: int, train_config, config: AutoFieldConfig | None = None, *,
                     model_cfg: dict | None = None, run_dir=None) -> dict:
    """Run the AutoField search only. Returns ``{"keep", "keep_probabilities", "seconds", ...}``."""
    config = config or AutoFieldConfig()
    seed_everything(train_config.seed)
    emb = AutoFieldEmbedding(data.feature_map, embed_dim)
    cb = DartsArchitectureCallback(emb, arch_lr=config.arch_lr, arch_weight_decay=config.arch_weight_decay,
                                   arch_every=config.arch_every, temperature_decay=config.temperature_decay,
                                   min_temperature=config.min_temperature, second_order=config.second_order)
    cfg = method_train_config(train_config, epochs=config.search_epochs)
    t0 = time.perf_counter()
    _, res = train_and_evaluate(data, model_name, emb, cfg, model_cfg=model_cfg, run_dir=run_dir, callbacks=[cb])
    wall = time.perf_counter() - t0
    seconds = float(res["train_seconds"])  # training epochs of the search, architecture steps included
    keep = emb.select(config.num_kept(emb.num_fields))
    names = list(data.feature_map.field_names)
    log.info("AutoField: keeping fields %s", [names[f] for f in keep])
    return {"keep": keep, "kept_fields": [names[f] for f in keep],
            "keep_probabilities": emb.keep_probabilities().tolist(), "field_names": names,
            "seconds": seconds, "wall_seconds": wall, "arch_steps": cb.arch_steps,
            "supernet_test_auc": res["auc"]}


def run_autofield(data, model_name: str, embed_dim: int, train_config, config: AutoFieldConfig | None = None, *,
                  model_cfg: dict | None = None, run_dir=None) -> dict:
    """Search, keep the top fields, retrain on them. Returns ``{"rows": [...], "search": {...}}``."""
    config = config or AutoFieldConfig()
    run_dir = Path(run_dir) if run_dir is not None else None
    search = search_autofield(data, model_name, embed_dim, train_config, config, model_cfg=model_cfg,
                              run_dir=run_dir / "search" if run_dir is not None else None)
    rows = []
    if config.retrain:
        sub = drop_fields(data, search["keep"]) if config.remove_fields else data
        seed_everything(train_config.seed)
        emb = FieldSelectedEmbedding(sub.feature_map, embed_dim, search["keep"])
        _, res = train_and_evaluate(sub, model_name, emb, train_config, model_cfg=model_cfg,
                                    run_dir=run_dir / "retrain" if run_dir is not None else None)
        res["train_seconds"] += search["seconds"]
        variant = f"keep{len(search['keep'])}" + ("" if config.remove_fields else "-emb")
        rows.append(make_row("autofield", variant, res, search_seconds=search["seconds"],
                             kept_fields=search["kept_fields"], remove_fields=config.remove_fields))
    return {"rows": rows, "search": search}


def autofield_config_from_dict(values: dict) -> AutoFieldConfig:
    return dataclass_from_dict(AutoFieldConfig, values, "AutoField")


@register_method
class AutoField(Method):
    """AutoField (Wang et al., WWW 2022) on the shared trainer: :func:`run_autofield`."""

    name = "autofield"
    title = "AutoField"
    config_class = AutoFieldConfig
    help = "AutoField: field gates searched on validation data, keep the top fields, retrain"

    def build_embedding(self, feature_map, embed_dim: int) -> AutoFieldEmbedding:
        return AutoFieldEmbedding(feature_map, embed_dim)

    def run(self, data, model_name: str, settings: RunSettings, run_dir=None) -> MethodResult:
        return MethodResult.from_dict(run_autofield(data, model_name, settings.embed_dim, settings.train,
                                                    self.config, model_cfg=settings.model_cfg, run_dir=run_dir))
