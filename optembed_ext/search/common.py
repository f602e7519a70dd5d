"""Helpers every method schedule shares: option checking, seeding, training settings, train-then-test, rows.

Nothing here knows a particular method; the methods (``uniform``, ``optembed``, ``pep``, ...) import from here
and the comparison harness only iterates over the registry (:mod:`optembed_ext.search.base`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..train.checkpoint import seed_everything as _seed_everything
from ..train.config import TrainConfig
from ..train.config import dataclass_from_dict as _dataclass_from_dict


def dataclass_from_dict(cls, values: dict, what: str):
    """``cls(**values)`` for a method's config dataclass; keys may use ``-``; keys that are not fields raise
    ValueError naming them (``unknown <what> option(s)``)."""
    return _dataclass_from_dict(cls, values, f"{what} option")


def seed_everything(seed: int) -> None:
    """Seed every generator before a module is built, so every method starts from the same state."""
    _seed_everything(int(seed))


def method_train_config(base: TrainConfig, **overrides) -> TrainConfig:
    """``base`` with the given fields replaced; ``None`` values keep ``base``'s, except ``patience`` which is
    replaced (``patience=None`` disables early stopping)."""
    values = base.to_dict()
    for k, v in overrides.items():
        if k not in values:
            raise ValueError(f"unknown TrainConfig field {k!r}")
        if v is not None or k == "patience":
            values[k] = v
    return TrainConfig(**values)


@dataclass
class RunSettings:
    """What every method of one comparison shares: the embedding size, the training settings and the backbone
    options (keyword arguments of :func:`optembed_ext.models.build_model`)."""

    embed_dim: int = 16
    train: TrainConfig = field(default_factory=TrainConfig)
    model_cfg: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        self.model_cfg = dict(self.model_cfg or {})


def train_and_evaluate(data, model_name: str, embedding, train_config: TrainConfig, *, model_cfg: dict | None = None,
                       run_dir=None, callbacks=()):
    """Build ``model_name`` around ``embedding``, train it with the shared trainer, evaluate it on the test split.

    Returns ``(trainer, res)`` with ``res`` = ``{"auc", "logloss", "num_params", "sparsity", "memory_bytes",
    "train_seconds", "infer_seconds", "best_epoch", "epochs_run", "val_auc"}`` (the best-validation state is
    restored before the test evaluation).
    """
    from ..models import build_model
    from ..train.trainer import Trainer

    model = build_model(model_name, data.feature_map, embedding, **(model_cfg or {}))
    trainer = Trainer(model, data, train_config, run_dir=run_dir, callbacks=list(callbacks))
    result = trainer.fit(resume=True)
    res = {
        "auc": float(result["test_auc"]),
        "logloss": float(result["test_logloss"]),
        "num_params": int(embedding.num_params()),
        "sparsity": float(embedding.sparsity()),
        "memory_bytes": int(embedding.memory_bytes()),
        "train_seconds": float(sum(result.get("epoch_times", []))),
        "infer_seconds": float(result.get("test_eval_seconds", math.nan)),
        "best_epoch": result.get("best_epoch"),
        "epochs_run": result.get("epochs_run"),
        "val_auc": result.get("best_val_auc"),
    }
    return trainer, res


def make_row(method: str, variant: str, res: dict, **extra) -> dict:
    """A result row from a :func:`train_and_evaluate` result (plus method-specific extras)."""
    row = {"method": method, "variant": str(variant)}
    for k in ("auc", "logloss", "num_params", "sparsity", "memory_bytes", "train_seconds", "infer_seconds",
              "best_epoch", "epochs_run", "val_auc"):
        row[k] = res.get(k)
    row["search_seconds"] = float(extra.pop("search_seconds", 0.0))
    row.update(extra)
    return row
