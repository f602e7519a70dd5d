"""What a finished run leaves behind, how to read it back and how to rebuild the model it describes.

This module sits below both the search schedules (:mod:`optembed_ext.search`), which write these files, and the
export (:mod:`optembed_ext.export`), which reads them; neither imports the other for it.

- :class:`MethodResult`: the outcome of one method on one dataset and backbone (result rows + search details),
  as written to a method folder's ``metrics.json`` and read back by :func:`read_method_folder`.
- ``optembed_result.pt`` (:data:`RESULT_FILE`): the searched table of a finished OptEmbed run (row mask, field
  dims, retrained weights, backbone settings), written by :func:`save_search_result`, read by
  :func:`load_search_result`, rebuilt into a model by :func:`build_retrained_model`.
- Small atomic file helpers every run folder uses (:func:`write_json`, :func:`read_json`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULT_FILE = "optembed_result.pt"
RESULT_FORMAT = "optembed-result/1"

#: columns of the result rows, in table order
RESULT_COLUMNS = ("dataset", "model", "method", "variant", "auc", "logloss", "num_params", "sparsity",
                  "memory_bytes", "train_seconds", "search_seconds", "infer_seconds", "seed")


# ============================================================================== JSON files
def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    return str(o)


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON through a temporary file and an atomic rename (rank 0 alone under torchrun)."""
    from .train.distributed import is_main

    path = Path(path)
    if not is_main():
        return path
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    tmp.replace(path)
    return path


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ============================================================================== method results
@dataclass
class MethodResult:
    """The outcome of one method run: one result row per trained variant plus the search details.

    Each row holds at least ``method``, ``variant``, ``auc``, ``logloss``, ``num_params``, ``sparsity``,
    ``memory_bytes``, ``train_seconds``, ``search_seconds`` and ``infer_seconds`` (see :data:`RESULT_COLUMNS`);
    ``search`` is method specific (chosen dims, saved masks, phase times, ...).
    """

    rows: list[dict] = field(default_factory=list)
    search: dict | None = None

    def to_dict(self) -> dict:
        return {"rows": list(self.rows), "search": self.search}

    @classmethod
    def from_dict(cls, values: dict) -> "MethodResult":
        if isinstance(values, MethodResult):
            return values
        return cls(rows=list(values.get("rows", [])), search=values.get("search"))

    # dict-style access keeps the ``{"rows": ..., "search": ...}`` shape of earlier versions working
    def __getitem__(self, key: str):
        if key == "rows":
            return self.rows
        if key == "search":
            return self.search
        raise KeyError(key)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default


def read_method_folder(path) -> dict | None:
    """The ``metrics.json`` of a finished method folder (``{"complete": true, "rows": [...], ...}``), or None
    when the folder holds no complete result."""
    f = Path(path) / "metrics.json"
    if not f.is_file():
        return None
    try:
        m = read_json(f)
    except (OSError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("complete") and isinstance(m.get("rows"), list) else None


def num_or_nan(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# ============================================================================== feature maps
def feature_map_to_dict(fmap) -> dict:
    if hasattr(fmap, "to_dict"):
        return fmap.to_dict()
    return {"dataset": fmap.dataset, "field_names": list(fmap.field_names),
            "cardinalities": [int(c) for c in fmap.cardinalities]}


def feature_map_from_dict(d: dict):
    from .data import FeatureMap

    return FeatureMap.from_dict(d)


# ============================================================================== OptEmbed results
def build_optembed_model(model_name: str, feature_map, embed_dim: int, *, model_cfg: dict | None = None,
                         norm: int = 1, alpha: float = 3e-4, threshold_lr: float = 3e-4, threshold_init: float = 0.0,
                         prune_rows: bool = True, oov: bool = False):
    """A backbone around an :class:`~optembed_ext.nn.optembed.OptEmbedEmbedding` with the given settings."""
    from .models import build_model
    from .nn.optembed import OptEmbedEmbedding

    emb = OptEmbedEmbedding(feature_map, int(embed_dim), norm=norm, alpha=alpha, threshold_lr=threshold_lr,
                            threshold_init=threshold_init, prune_rows=prune_rows, oov=oov)
    return build_model(model_name, feature_map, emb, **dict(model_cfg or {}))


def save_search_result(path, *, row_mask: torch.Tensor, field_dims, feature_map, model_name: str, model_cfg: dict,
                       embed_dim: int, norm: int, oov: bool, state_dict: dict, metrics: dict) -> Path:
    """Write the searched table of a finished OptEmbed run (see :func:`load_search_result` for the fields)."""
    path = Path(path)
    counts = torch.zeros(feature_map.num_fields, dtype=torch.long)
    counts.index_add_(0, feature_map.field_of_row().long().cpu(), row_mask.long().cpu())
    payload: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "row_mask": row_mask.bool().cpu(),
        "field_dims": [int(d) for d in field_dims],
        "kept_rows_per_field": [int(x) for x in counts.tolist()],
        "feature_map": feature_map_to_dict(feature_map),
        "model_name": model_name,
        "model_cfg": dict(model_cfg),
        "embed_dim": int(embed_dim),
        "norm": int(norm),
        "oov": bool(oov),
        "state_dict": state_dict,
        "metrics": metrics,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def result_path(run) -> Path:
    """``optembed_result.pt`` of a run folder (or the file itself)."""
    path = Path(run)
    if path.is_file():
        if path.name != RESULT_FILE:
            raise ValueError(f"expected a run folder or its {RESULT_FILE}, got the file {path}")
        return path
    if not path.exists():
        raise FileNotFoundError(f"run folder not found: {path}")
    return path / RESULT_FILE


def load_search_result(run_dir) -> dict:
    """The searched table of a finished run, for export: ``run_dir/optembed_result.pt`` as a dict with

    ``row_mask`` bool (N,), ``field_dims`` list[int] (F), ``kept_rows_per_field`` list[int], ``feature_map``
    (:class:`~optembed_ext.data.FeatureMap`), ``model_name``, ``model_cfg`` (kwargs of ``build_model``),
    ``embed_dim``, ``norm``, ``oov``, ``state_dict`` (the retrained model: ``embedding.weight`` (N, D) with pruned
    rows / dims to be dropped, ``embedding.fixed_row_mask``, ``embedding.fixed_field_dims``, the backbone) and
    ``metrics``. ``run_dir`` may also be the file itself.
    """
    path = result_path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"run_dir has no {RESULT_FILE} (is the OptEmbed run finished, with retraining?): "
                                f"{path}")
    try:
        res = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign file: name it instead of an unpickling traceback
        raise ValueError(f"{path} is not a readable {RESULT_FILE} ({type(err).__name__}: {err}); rerun the "
                         f"search with --no-resume or into a new --out") from err
    if not isinstance(res, dict) or "row_mask" not in res or "state_dict" not in res:
        raise ValueError(f"{path} is not an OptEmbed result file (missing row_mask / state_dict)")
    res["feature_map"] = feature_map_from_dict(res["feature_map"])
    return res


def build_retrained_model(result: dict):
    """Rebuild the retrained OptEmbed model (masks frozen) from :func:`load_search_result`'s dict."""
    model = build_optembed_model(result["model_name"], result["feature_map"], int(result["embed_dim"]),
                                 model_cfg=dict(result["model_cfg"]), norm=int(result["norm"]),
                                 oov=bool(result["oov"]))
    model.embedding.freeze(result["row_mask"], result["field_dims"])
    model.load_state_dict(result["state_dict"])
    return model
