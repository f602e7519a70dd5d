"""Core data containers: the feature map of an encoded dataset and its train/val/test splits."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FeatureMap", "CTRSplit", "CTRDataset"]


@dataclass
class FeatureMap:
    """Field layout of an encoded dataset.

    Every field ``f`` owns the contiguous block of global ids
    ``[offsets[f], offsets[f] + cardinalities[f])`` of one shared embedding table with
    ``num_features`` rows. For datasets built from raw files, local id 0 of each field is the
    out-of-vocabulary (rare / unseen value) id and local id 1 the empty (missing value) id.

    ``stats`` carries optional preprocessing statistics (row counts, malformed rows, per-field
    vocabulary figures); it is informational and never needed to use the map.
    """

    dataset: str
    field_names: list[str]
    cardinalities: list[int]
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.field_names = [str(n) for n in self.field_names]
        self.cardinalities = [int(c) for c in self.cardinalities]
        if len(self.field_names) != len(self.cardinalities):
            raise ValueError(
                f"field_names has {len(self.field_names)} entries but cardinalities has {len(self.cardinalities)}"
            )
        if len(set(self.field_names)) != len(self.field_names):
            raise ValueError(f"field_names must be unique, got {self.field_names}")
        bad = [c for c in self.cardinalities if c < 1]
        if bad:
            raise ValueError(f"cardinalities must all be >= 1, got {self.cardinalities}")

    @property
    def offsets(self) -> list[int]:
        """Exclusive cumulative sum of the cardinalities (``offsets[0] == 0``)."""
        out, acc = [], 0
        for c in self.cardinalities:
            out.append(acc)
            acc += c
        return out

    @property
    def num_fields(self) -> int:
        return len(self.cardinalities)

    @property
    def num_features(self) -> int:
        """Total number of rows of a uniform embedding table, ``sum(cardinalities)``."""
        return int(sum(self.cardinalities))

    def field_of_row(self) -> torch.Tensor:
        """LongTensor (num_features,): the field index owning each global row."""
        return torch.repeat_interleave(
            torch.arange(self.num_fields, dtype=torch.long),
            torch.tensor(self.cardinalities, dtype=torch.long),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "field_names": list(self.field_names),
            "cardinalities": list(self.cardinalities),
            "stats": _jsonable(self.stats),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureMap":
        return cls(
            dataset=d["dataset"],
            field_names=list(d["field_names"]),
            cardinalities=list(d["cardinalities"]),
            stats=dict(d.get("stats", {})),
        )

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path) -> "FeatureMap":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class CTRSplit:
    """One split: ``X`` (n, F) int64 global ids (field offsets already added), ``y`` (n,) float32 in {0, 1}.

    Inputs are converted with ``np.asarray`` (no copy when they already have the right dtype).
    """

    X: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        self.X = np.asarray(self.X, dtype=np.int64)
        self.y = np.asarray(self.y, dtype=np.float32)
        if self.X.ndim != 2:
            raise ValueError(f"X must be 2-D (n, num_fields), got shape {self.X.shape}")
        if self.y.ndim != 1 or self.y.shape[0] != self.X.shape[0]:
            raise ValueError(f"y must have shape ({self.X.shape[0]},), got {self.y.shape}")

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def num_fields(self) -> int:
        return int(self.X.shape[1])


@dataclass
class CTRDataset:
    """An encoded dataset: its feature map, three splits and free-form ``info`` (see the loaders)."""

    feature_map: FeatureMap
    train: CTRSplit
    val: CTRSplit
    test: CTRSplit
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("train", "val", "test"):
            s = getattr(self, name)
            if s.num_fields != self.feature_map.num_fields:
                raise ValueError(
                    f"{name}.X has {s.num_fields} columns but the feature map has {self.feature_map.num_fields} fields"
                )

    def split(self, name: str) -> CTRSplit:
        """The split called ``name`` ("train", "val" or "test")."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split name must be 'train', 'val' or 'test', got {name!r}")
        return getattr(self, name)


def _jsonable(obj):
    """Convert numpy scalars/arrays inside nested containers to plain Python for JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
