"""Training-loop hooks of the OptEmbed phases: the supernet's dimension sampling and best row mask, wall time."""
from __future__ import annotations

import math
import time

import torch

from ...nn.optembed import OptEmbedEmbedding
from ...train.callbacks import Callback
from ...train.config import monitor_score

# =========================================================================== callbacks
class OptEmbedSupernetCallback(Callback):
    """Search schedule of the supernet phase.

    * ``on_batch_begin``: draws the kept dimension of every sample and field uniformly from ``1..D`` (prefix
      masks) when ``sample_dims``; the embedding applies them in training mode only, so evaluation uses the
      full dimension.
    * ``on_epoch_end``: keeps the row mask ``m_e`` of the best validation epoch (by the trainer's
      ``config.monitor``: AUC by default), the epoch whose state the trainer restores.

    Its state (RNG, best epoch and mask, history) is saved in the trainer checkpoint, so a resumed run continues
    exactly.
    """

    def __init__(self, embedding: OptEmbedEmbedding, sample_dims: bool = True, seed: int = 0):
        self.embedding = embedding
        self.sample_dims = bool(sample_dims)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.best_auc = -math.inf
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_row_mask: torch.Tensor | None = None
        self.history: list[dict] = []

    def on_batch_begin(self, trainer, ids, labels) -> None:
        if not self.sample_dims:
            return
        # under data parallelism (``trainer.batch_shard = (positions, global_batch)``) the dims are drawn for the
        # whole global batch, the same draws as in one process, and this rank keeps those of the rows it holds
        shard = getattr(trainer, "batch_shard", None)
        rows = ids.shape[0] if shard is None else shard[1]
        dims = torch.randint(1, self.embedding.embed_dim + 1, (rows, self.embedding.num_fields),
                             generator=self.generator)
        if shard is not None:
            dims = dims[shard[0]]
        self.embedding.set_dims(dims)

    def on_epoch_end(self, trainer, epoch: int, val_metrics: dict) -> None:
        self.embedding.set_dims(None)
        auc = float(val_metrics.get("auc", -math.inf))
        score = monitor_score(getattr(trainer.config, "monitor", "auc"), auc,
                              float(val_metrics.get("logloss", math.nan)))
        mask = self.embedding.row_mask().cpu()
        entry = {"epoch": int(epoch), "val_auc": auc, "kept_rows": int(mask.sum()),
                 "kept_rows_per_field": self.embedding.kept_rows_per_field()}
        if self.embedding.threshold is not None:  # per field (the mean of its rows' with per-row thresholds)
            entry["threshold"] = self.embedding.field_thresholds()
        self.history.append(entry)
        if score > self.best_score:  # False for NaN, as the trainer's choice of its best epoch
            self.best_auc, self.best_score, self.best_epoch, self.best_row_mask = auc, score, int(epoch), mask

    def on_train_end(self, trainer) -> None:
        self.embedding.set_dims(None)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "best_auc": self.best_auc, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "best_row_mask": self.best_row_mask, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.best_auc = float(state["best_auc"])
        self.best_score = float(state.get("best_score", state["best_auc"]))  # older checkpoints: monitor auc
        self.best_epoch = int(state["best_epoch"])
        self.best_row_mask = state["best_row_mask"]
        self.history = list(state.get("history", []))


class WallTimeCallback(Callback):
    """Accumulates the wall time of a training phase across interruptions (saved in the trainer checkpoint)."""

    def __init__(self):
        self.seconds = 0.0
        self._last = None

    def on_train_begin(self, trainer) -> None:
        self._last = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last
        self._last = now

    def on_epoch_end(self, trainer, epoch: int, val_metrics: dict) -> None:
        self._tick()

    def total(self) -> float:
        self._tick()
        return self.seconds

    def state_dict(self) -> dict:
        self._tick()
        return {"seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = float(state.get("seconds", 0.0))
