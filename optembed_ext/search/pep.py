"""PEP search schedule: one pruning run that saves a mask at several parameter budgets, then retraining.

Pruning (:class:`PEPPruningCallback`): a :class:`~optembed_ext.nn.pep.PEPEmbedding` with a learnable
threshold is trained; after every step the kept-parameter count is measured and, when the sparsity crosses a
target (``target_sparsities``), the mask is saved (``masks/sparsity-<target>.pt``). With ``exact_budget`` (the
default) the saved mask keeps exactly ``round((1 - target) * N * D)`` entries: those of the largest margin
``|V| - threshold`` (every entry the threshold keeps at that step, plus the least-pruned ones to fill the
budget), so the budgets of different methods can be compared at equal size. The initial table is saved before
the first step, for lottery-ticket retraining. Training stops once every target is reached; targets not reached
by the end are replaced by the mask of the last epoch (``final_mask``).

Retraining: for each saved mask a fresh model is trained with ``V * mask`` (no threshold), starting from the
pruning run's initial table (``re_init=False``, lottery ticket, the official default) or a fresh
initialisation (``re_init=True``).

Official defaults (ssui-liu/learnable-embed-sizes-for-RecSys): threshold ``feature_dim``, ``s`` initialised at
-15 (MovieLens) or -150 (Criteo/Avazu), ``g = sigmoid``, Adam lr 1e-3 with weight decay 1e-5 on every
parameter (``s`` included), batch size 1024.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..nn.pep import THRESHOLD_TYPES, PEPEmbedding, default_threshold_init
from ..results import MethodResult
from ..train.callbacks import Callback
from .base import Method, register_method
from .common import RunSettings, dataclass_from_dict, make_row, method_train_config, seed_everything, train_and_evaluate

log = logging.getLogger(__name__)


@dataclass
class PEPConfig:
    """Settings of a PEP run (pruning + retraining). ``None`` means "as the shared training config"."""

    threshold_type: str = "feature_dim"
    threshold_init: float | None = None      # None: official default for the dataset (-15 / -150)
    gk: float = 1.0
    threshold_lr: float | None = None        # None: the training lr (official)
    target_sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9])
    weight_decay: float | None = 1e-5        # official; applied to V and s (None: the shared training setting)
    batch_size: int | None = None            # official 1024 (None: the shared training setting)
    grad_clip: float | None = 100.0          # official gradient-norm clip (None: the shared training setting)
    prune_epochs: int | None = None          # None: the training epochs
    re_init: bool = False                    # False: lottery ticket (initial values of the pruning run)
    retrain: bool = True
    check_every: int = 1
    exact_budget: bool = True                # saved masks keep exactly (1 - target) * N * D entries
    final_mask: bool = True                  # targets not reached: retrain with the last epoch's mask instead

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


def budget_mask(embedding: PEPEmbedding, target: float) -> torch.Tensor:
    """Bool ``(N, D)`` mask keeping exactly ``round((1 - target) * N * D)`` entries: those with the largest
    soft-threshold margin ``|V| - threshold`` (ties broken by position)."""
    with torch.no_grad():
        margin = (embedding.weight.abs() - embedding.threshold()).flatten()
        keep = int(round((1.0 - float(target)) * margin.numel()))
        mask = torch.zeros(margin.numel(), dtype=torch.bool, device=margin.device)
        if keep > 0:
            mask[torch.topk(margin, keep, sorted=False).indices] = True
        return mask.view_as(embedding.weight)


class PEPPruningCallback(Callback):
    """Saves the initial table and, each time the sparsity crosses a target, the pruning mask.

    Files in ``out_dir``: ``initial_embedding.pt`` (the ``(N, D)`` table before the first step),
    ``masks/sparsity-<target>.pt`` (``{"mask": bool (N, D), "target", "sparsity", "num_params", "step",
    "threshold_sparsity"}``; ``threshold_sparsity`` is the sparsity the threshold itself gave at that step) and,
    with ``final_mask``, ``masks/final.pt`` (the mask after the last epoch).

    Args:
        embedding: the pruning run's :class:`PEPEmbedding` (learnable threshold).
        target_sparsities: sparsities at which to save a mask.
        out_dir: folder of the files above.
        check_every: measure the sparsity every that many steps.
        exact_budget: save exactly ``(1 - target) * N * D`` entries (see :func:`budget_mask`); otherwise the
            threshold's own mask at the crossing step.
        stop_when_done: stop training once every target is saved.
        final_mask: save the mask after every epoch to ``masks/final.pt``.
    """

    def __init__(self, embedding: PEPEmbedding, target_sparsities, out_dir, check_every: int = 1,
                 exact_budget: bool = True, stop_when_done: bool = True, final_mask: bool = True):
        self.embedding = embedding
        self.targets = sorted(float(t) for t in target_sparsities)
        self.out_dir = Path(out_dir)
        self.check_every = int(check_every)
        self.exact_budget = bool(exact_budget)
        self.stop_when_done = bool(stop_when_done)
        self.final_mask = bool(final_mask)
        self.saved: dict[str, dict] = {}
        self.final: dict | None = None
        self.history: list[dict] = []

    def mask_path(self, target: float) -> Path:
        return self.out_dir / "masks" / f"sparsity-{_tag(target)}.pt"

    @property
    def final_path(self) -> Path:
        return self.out_dir / "masks" / "final.pt"

    @property
    def initial_path(self) -> Path:
        return self.out_dir / "initial_embedding.pt"

    def on_train_begin(self, trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.initial_path.exists():
            torch.save(self.embedding.weight.detach().cpu().clone(), self.initial_path)

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
                m = budget_mask(self.embedding, t) if self.exact_budget else mask
                n = int(m.sum())
                rec = {"target": t, "sparsity": 1.0 - n / float(m.numel()), "num_params": n, "step": step,
                       "threshold_sparsity": sparsity}
                (self.out_dir / "masks").mkdir(parents=True, exist_ok=True)
                torch.save({"mask": m.cpu(), **rec}, self.mask_path(t))
                self.saved[_tag(t)] = rec
                log.info("PEP: sparsity %.4f crossed target %g at step %d (mask of %d parameters saved)",
                         sparsity, t, step, n)
        if self.stop_when_done and len(self.saved) == len(self.targets):
            trainer.stop_training = True

    def on_batch_end(self, trainer, loss: float) -> None:
        if int(getattr(trainer, "global_step", 0)) % self.check_every == 0:
            self._check(trainer)

    def on_epoch_end(self, trainer, epoch: int, val_metrics: dict) -> None:
        self._check(trainer)
        sparsity = self.embedding.sparsity()
        self.history.append({"epoch": int(epoch), "sparsity": sparsity, "val_auc": val_metrics.get("auc"),
                             "step": int(getattr(trainer, "global_step", 0))})
        if self.final_mask:
            mask = self.embedding.current_mask()
            n = int(mask.sum())
            self.final = {"target": None, "sparsity": 1.0 - n / float(mask.numel()), "num_params": n,
                          "step": int(getattr(trainer, "global_step", 0)), "epoch": int(epoch)}
            (self.out_dir / "masks").mkdir(parents=True, exist_ok=True)
            torch.save({"mask": mask.cpu(), **self.final}, self.final_path)

    def state_dict(self) -> dict:
        return {"saved": dict(self.saved), "history": list(self.history), "final": self.final}

    def load_state_dict(self, state: dict) -> None:
        self.saved = dict(state.get("saved", {}))
        self.history = list(state.get("history", []))
        self.final = state.get("final")


def run_pep(data, model_name: str, embed_dim: int, train_config, config: PEPConfig | None = None, *,
            model_cfg: dict | None = None, run_dir=None) -> dict:
    """Prune once, then retrain at every budget reached. Returns ``{"rows": [...], "search": {...}}``.

    Each row is a result row (see :func:`optembed_ext.search.common.make_row`) for one budget; its
    ``train_seconds`` include the pruning run's training time (also given as ``search_seconds``). Targets not
    reached are replaced (``final_mask``) by one retraining with the mask of the pruning run's last epoch.
    Run folders: ``run_dir/prune`` and ``run_dir/retrain-<target>`` (``run_dir/retrain-final``).
    """
    config = config or PEPConfig()
    run_dir = Path(run_dir) if run_dir is not None else None
    fmap = data.feature_map
    s_init = config.threshold_init if config.threshold_init is not None else default_threshold_init(fmap.dataset)
    overrides = {"weight_decay": config.weight_decay, "batch_size": config.batch_size,
                 "grad_clip": config.grad_clip}
    prune_cfg = method_train_config(train_config, epochs=config.prune_epochs, patience=None, **overrides)
    retrain_cfg = method_train_config(train_config, **overrides)
    prune_dir = run_dir / "prune" if run_dir is not None else Path(_tmpdir()) / "prune"

    seed_everything(train_config.seed)
    emb = PEPEmbedding(fmap, embed_dim, threshold_type=config.threshold_type, threshold_init=s_init,
                       gk=config.gk, threshold_lr=config.threshold_lr)
    cb = PEPPruningCallback(emb, config.target_sparsities, prune_dir, check_every=config.check_every,
                            exact_budget=config.exact_budget, final_mask=config.final_mask)
    t0 = time.perf_counter()
    _, prune_res = train_and_evaluate(data, model_name, emb, prune_cfg, model_cfg=model_cfg, run_dir=prune_dir,
                                      callbacks=[cb])
    prune_wall = time.perf_counter() - t0
    prune_seconds = float(prune_res["train_seconds"])
    missing = [t for t in config.target_sparsities if _tag(t) not in cb.saved]
    search = {"threshold_init": s_init, "threshold_type": config.threshold_type,
              "final_sparsity": cb.final["sparsity"] if cb.final else None, "saved": cb.saved,
              "history": cb.history, "seconds": prune_seconds, "wall_seconds": prune_wall,
              "prune_test_auc": prune_res["auc"], "missing_targets": missing}
    if missing:
        log.warning("PEP: targets %s not reached (sparsity after the last epoch %.4f)%s", missing,
                    search["final_sparsity"] or 0.0,
                    "; retraining with the last epoch's mask instead" if config.final_mask else "")

    rows = []
    if not config.retrain:
        return {"rows": rows, "search": search}
    initial = torch.load(cb.initial_path)
    budgets = [(f"sp{_tag(t)}", t, cb.mask_path(t)) for t in config.target_sparsities if _tag(t) in cb.saved]
    if missing and config.final_mask and cb.final is not None and cb.final_path.exists():
        budgets.append(("final", None, cb.final_path))
    for variant, t, path in budgets:
        saved = torch.load(path)
        seed_everything(train_config.seed)
        remb = PEPEmbedding(fmap, embed_dim, threshold_type=config.threshold_type, threshold_init=s_init,
                            gk=config.gk, mask=saved["mask"], init_weight=None if config.re_init else initial)
        sub = run_dir / f"retrain-{variant[2:] if t is not None else variant}" if run_dir is not None else None
        _, res = train_and_evaluate(data, model_name, remb, retrain_cfg, model_cfg=model_cfg, run_dir=sub)
        res["train_seconds"] += prune_seconds
        name = variant if t is not None else f"final-sp{saved['sparsity']:.2f}"
        rows.append(make_row("pep", name, res, search_seconds=prune_seconds, target_sparsity=t,
                             re_init=config.re_init, mask_step=saved.get("step"),
                             weight_decay=retrain_cfg.weight_decay, batch_size=retrain_cfg.batch_size,
                             grad_clip=retrain_cfg.grad_clip))
    return {"rows": rows, "search": search}


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="pep-")


def pep_config_from_dict(values: dict) -> PEPConfig:
    return dataclass_from_dict(PEPConfig, values, "PEP")


@register_method
class PEP(Method):
    """PEP (Liu et al., ICLR 2021) on the shared trainer: :func:`run_pep`.

    ``weight_decay``, ``batch_size`` and ``grad_clip`` repeat shared training options: ``optembed pep`` takes
    them from ``--weight-decay`` / ``--batch-size`` / ``--grad-clip`` (whose defaults there are the official
    1e-5 / 1024 / 100); in ``compare`` PEP trains at the shared settings like every other method unless its
    mapping sets them, and each row states the values it was trained with."""

    name = "pep"
    title = "PEP"
    config_class = PEPConfig
    help = "PEP: soft-threshold pruning at several budgets, then (lottery-ticket) retraining"
    shared_fields = ("weight_decay", "batch_size", "grad_clip")
    #: official PEP training defaults (ssui-liu/learnable-embed-sizes-for-RecSys)
    train_defaults = {"weight_decay": 1e-5, "batch_size": 1024, "grad_clip": 100.0}

    def build_embedding(self, feature_map, embed_dim: int) -> PEPEmbedding:
        c = self.config
        s_init = c.threshold_init if c.threshold_init is not None else default_threshold_init(feature_map.dataset)
        return PEPEmbedding(feature_map, embed_dim, threshold_type=c.threshold_type, threshold_init=s_init,
                            gk=c.gk, threshold_lr=c.threshold_lr)

    def run(self, data, model_name: str, settings: RunSettings, run_dir=None) -> MethodResult:
        return MethodResult.from_dict(run_pep(data, model_name, settings.embed_dim, settings.train, self.config,
                                              model_cfg=settings.model_cfg, run_dir=run_dir))
