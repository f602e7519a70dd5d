"""Evaluation metrics: global AUC and clipped log loss over a split, embedding size statistics, timing."""
from __future__ import annotations

import time

import numpy as np
from sklearn.metrics import log_loss as _sk_log_loss
from sklearn.metrics import roc_auc_score

#: probabilities are clipped to [LOGLOSS_EPS, 1 - LOGLOSS_EPS] before the log loss
LOGLOSS_EPS = 1e-7


def _as_arrays(y_true, y_score, score_name: str):
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_score = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true and {score_name} must have the same length, got {y_true.size} and {y_score.size}")
    if y_true.size == 0:
        raise ValueError("y_true is empty")
    if not np.isin(y_true, (0.0, 1.0)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if not np.isfinite(y_score).all():
        raise ValueError(f"{score_name} contains NaN or infinite values")
    return y_true, y_score


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve over all examples (sklearn ``roc_auc_score``).

    Raises ValueError when ``y_true`` holds a single class (AUC undefined).
    """
    y_true, y_score = _as_arrays(y_true, y_score, "y_score")
    if y_true.min() == y_true.max():
        raise ValueError("y_true contains a single class; AUC is undefined")
    return float(roc_auc_score(y_true, y_score))


def log_loss(y_true, y_prob, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy with probabilities clipped to ``[eps, 1 - eps]`` (sklearn ``log_loss``)."""
    y_true, y_prob = _as_arrays(y_true, y_prob, "y_prob")
    if (y_prob < 0).any() or (y_prob > 1).any():
        raise ValueError("y_prob must lie in [0, 1]")
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    return float(_sk_log_loss(y_true, np.clip(y_prob, eps, 1 - eps), labels=[0.0, 1.0]))


def embedding_stats(embedding) -> dict:
    """``num_params``, ``sparsity`` and ``memory_bytes`` of an embedding module."""
    return {
        "num_params": int(embedding.num_params()),
        "sparsity": float(embedding.sparsity()),
        "memory_bytes": int(embedding.memory_bytes()),
    }


class Timer:
    """Wall-clock stopwatch: ``with Timer() as t: ...; t.seconds``."""

    def __init__(self):
        self.start = None
        self.seconds = 0.0

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False
