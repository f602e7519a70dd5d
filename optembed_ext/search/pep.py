"""PEP search schedule: one pruning run that saves a mask at several parameter budgets, then retraining.

Pruning (:class:`PEPPruningCallback`): a :class:`~optembed_ext.nn.pep.PEPEmbedding` with a learnable
threshold is trained; after every step the kept-parameter count is measured and, when the sparsity crosses a
target (``target_sparsities``), the current mask is saved (``masks/sparsity-<target>.pt``). The initial table
is saved before the first step, for lottery-ticket retraining. Training stops once every target is reached.

Retraining: for each saved mask a fresh model is trained with ``V * mask`` (no threshold), starting from the
pruning run's initial table (``re_init=False``, lottery ticket, the official default) or a fresh
initialisation (``re_init=True``).

Official defaults (ssui-liu/learnable-embed-sizes-for-RecSys): threshold ``feature_dim``, ``s`` initialised at
-15 (MovieLens) or -150 (Criteo/Avazu), ``g = sigmoid``, Adam lr 1e-3 with weight decay 1e-5 on every
parameter (``s`` included), batch size 1024.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..nn.pep import THRESHOLD_TYPES, PEPEmbedding, default_threshold_init
from ..train.callbacks import Callback
from .compare import make_row, method_train_config, seed_everything, train_and_evaluate

log = logging.getLogger(__name__)


@dataclass
class PEPConfig:
    """Settings of a PEP run (pruning + retraining). ``None`` means "as the shared training config"."""

    threshold_type: str = "feature_dim"
    threshold_init: float | None = None      # None: official default for the dataset (-15 / -150)
    gk: float = 1.0
    threshold_lr: float | None = None        # None: the training lr (official)
    target_sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9])
    weight_decay: float | None = 1e-5        # official; applied to V and s
    batch_size: int | None = None            # official 1024
    prune_epochs: int | None = None          # None: the training epochs
    re_init: bool = False                    # False: lottery ticket (initial values of the pruning run)
    retrain: bool = True
    check_every: int = 1

    def __post_init__(self):
        if self.threshold_type not in THRESHOLD_TYPES:
            raise ValueError(f"threshold_type must be one of {THRESHOLD_TYPES}, got {self.threshold_type!r}")
        targets = self.target_sparsities
        if isinstance(targets, (int, float)):
            targets = [targets]
        try:
            targets = sorted(float(t) for t in targets)
        except (TypeError, ValueError):
            raise ValueError(f"target_sparsities must be numbers in (0, 1), got {self.target_sparsities!r}") from None
        if not targets or any(not 0.0 < t < 1.0 for t in targets):
            raise ValueError(f"target_sparsities must be numbers in (0, 1), got {self.target_sparsities!r}")
        self.target_sparsities = targets
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {self.check_every!r}")
        if self.prune_epochs is not None and (not isinstance(self.prune_epochs, int) or self.prune_epochs < 1):
            raise ValueError(f"prune_epochs must be a positive int or None, got {self.prune_epochs!r}")


def _tag(target: float) -> str:
    return f"{target:g}"


class PEPPruningCallback(Callback):
    """Saves the initial table and, each time the sparsity crosses a target, the pruning mask.

    Files in ``out_dir``: ``initial_embedding.pt`` (the ``(N, D)`` table before the first step) and
    ``masks/sparsity-<target>.pt`` (``{"mask": bool (N, D), "target", "sparsity", "num_params", "step"}``).
    """

    def __init__(self, embedding: PEPEmbedding, target_sparsities, out_dir, check_every: int = 1,
                 stop_when_done: bool = True):
        self.embedding = embedding
        self.targets = sorted(float(t) for t in target_sparsities)
        self.out_dir = Path(out_dir)
        self.check_every = int(check_every)
        self.stop_when_done = bool(stop_when_done)
        self.saved: dict[str, dict] = {}
        self.history: list[dict] = []

    def mask_path(self, target: float) -> Path:
        return self.out_dir / "masks" / f"sparsity-{_tag(target)}.pt"

    @property
    def initial_path(self) -> Path:
        return self.out_dir / "initial_embedding.pt"

    def on_train_begin(self, trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.initial_path.exists():
            torch.save(self.embedding.weight.detach().cpu().clone(), self.initial_path)
        self._check(trainer)

    def _check(self, trainer) -> None:
        pending = [t for t in self.targets if _tag(t) not in self.saved]
        if not pending:
            return
        mask = self.embedding.current_mask()
        kept = int(mask.sum())
        sparsity = 1.0 - kept / float(mask.numel())
        step = int(getattr(trainer, "global_step", 0))
        for t in pending:
            if sparsity >= t:
                (self.out_dir / "masks").mkdir(parents=True, exist_ok=True)
                rec = {"target": t, "sparsity": sparsity, "num_params": kept, "step": step}
                torch.save({"mask": mask.cpu(), **rec}, self.mask_path(t))
                self.saved[_tag(t)] = rec
                log.info("PEP: sparsity %.4f crossed target %g at step %d (%d parameters)", sparsity, t, step, kept)
        if self.stop_when_done and len(self.saved) == len(self.targets):
            trainer.stop_training = True

    def on_batch_end(self, trainer, loss: float) -> None:
        if int(getattr(trainer, "global_step", 0)) % self.check_every == 0:
            self._check(trainer)

    def on_epoch_end(self, trainer, epoch: int, val_metrics: dict) -> None:
        self.history.append({"epoch": int(epoch), "sparsity": self.embedding.sparsity(),
                             "val_auc": val_metrics.get("auc")})

    def state_dict(self) -> dict:
        return {"saved": dict(self.saved), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.saved = dict(state.get("saved", {}))
        self.history = list(state.get("history", []))


def run_pep(data, model_name: str, embed_dim: int, train_config, config: PEPConfig | None = None, *,
            model_cfg: dict | None = None, run_dir=None) -> dict:
    """Prune once, then retrain at every budget reached. Returns ``{"rows": [...], "search": {...}}``.

    Each row is a result row (see :func:`optembed_ext.search.compare.make_row`) for one budget; its
    ``train_seconds`` include the pruning run. Run folders: ``run_dir/prune`` and ``run_dir/retrain-<target>``.
    """
    config = config or PEPConfig()
    run_dir = Path(run_dir) if run_dir is not None else None
    fmap = data.feature_map
    s_init = config.threshold_init if config.threshold_init is not None else default_threshold_init(fmap.dataset)
    overrides = {"weight_decay": config.weight_decay, "batch_size": config.batch_size}
    prune_cfg = method_train_config(train_config, epochs=config.prune_epochs, patience=None, **overrides)
    retrain_cfg = method_train_config(train_config, **overrides)
    prune_dir = run_dir / "prune" if run_dir is not None else Path(_tmpdir()) / "prune"

    seed_everything(train_config.seed)
    emb = PEPEmbedding(fmap, embed_dim, threshold_type=config.threshold_type, threshold_init=s_init,
                       gk=config.gk, threshold_lr=config.threshold_lr)
    cb = PEPPruningCallback(emb, config.target_sparsities, prune_dir, check_every=config.check_every)
    t0 = time.perf_counter()
    _, prune_res = train_and_evaluate(data, model_name, emb, prune_cfg, model_cfg=model_cfg, run_dir=prune_dir,
                                      callbacks=[cb])
    prune_seconds = time.perf_counter() - t0
    search = {"threshold_init": s_init, "threshold_type": config.threshold_type,
              "final_sparsity": emb.sparsity(), "saved": cb.saved, "history": cb.history,
              "seconds": prune_seconds, "prune_test_auc": prune_res["auc"]}
    missing = [t for t in config.target_sparsities if _tag(t) not in cb.saved]
    if missing:
        log.warning("PEP: targets %s not reached (final sparsity %.4f); no retraining for them",
                    missing, emb.sparsity())
    search["missing_targets"] = missing

    rows = []
    if not config.retrain:
        return {"rows": rows, "search": search}
    initial = torch.load(cb.initial_path)
    for t in config.target_sparsities:
        if _tag(t) not in cb.saved:
            continue
        mask = torch.load(cb.mask_path(t))["mask"]
        seed_everything(train_config.seed)
        remb = PEPEmbedding(fmap, embed_dim, threshold_type=config.threshold_type, threshold_init=s_init,
                            gk=config.gk, mask=mask, init_weight=None if config.re_init else initial)
        sub = run_dir / f"retrain-{_tag(t)}" if run_dir is not None else None
        _, res = train_and_evaluate(data, model_name, remb, retrain_cfg, model_cfg=model_cfg, run_dir=sub)
        res["train_seconds"] += prune_seconds
        rows.append(make_row("pep", f"sp{_tag(t)}", res, search_seconds=prune_seconds,
                             target_sparsity=t, re_init=config.re_init))
    return {"rows": rows, "search": search}


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="pep-")


def pep_config_from_dict(values: dict) -> PEPConfig:
    names = {f.name for f in dataclasses.fields(PEPConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown PEP option(s) {sorted(unknown)}; known: {sorted(names)}")
    return PEPConfig(**values)
