"""One trainer for every model and embedding method.

loss = BCEWithLogits(mean) + ``model.embedding.regularization()``; optimizer parameter groups =
``model.embedding.param_groups(lr, weight_decay)`` + the rest of the model (+ ``extra_param_groups``); early
stopping on the validation score of ``config.monitor`` (AUC by default, or log loss, or AUC - log loss); the
best-validation state is restored before the test evaluation.

Resuming: with a ``run_dir`` the trainer writes ``run_dir/checkpoint.pt`` after every epoch (and every
``checkpoint_every`` steps) holding the model, optimizer, callback states, RNG states, counters, the best state and
the early-stopping state. ``fit(resume=True)`` continues from it and, because the shuffling order is a function of
``(seed, epoch)`` and every generator state is restored, gives the same result as an uninterrupted run.

Data parallel (``torchrun``, :mod:`optembed_ext.train.distributed`): when a process group with more than one rank
is running, the model (with its embedding's regularization term) is wrapped in ``DistributedDataParallel``
(gradients, dense or row-sparse, averaged by the engine during ``backward``). ``batch_size`` stays the global
batch: every rank walks the same global batches as one process (the same shuffle), rank ``r`` owns a contiguous
block of the training split and holds, of every global batch, the rows lying in its block
(:func:`~optembed_ext.data.batching.shard_plan`; a memory-mapped split, :class:`~optembed_ext.data.batching.MappedSplit`,
is then read only in that block), the loss is scaled so that the averaged gradient is the gradient of the global
batch's mean loss, and ``trainer.batch_shard = (positions, global_batch)`` tells callbacks which rows of the global
batch this rank holds. A global batch that would leave some rank fewer than two rows is skipped by every rank (in
practice only a short last batch). With ``config.sync_batch_norm`` (default) batch norm uses the global batch's
statistics (:func:`~optembed_ext.train.distributed.sync_batch_norm`); without it each rank normalises with its own
rows and rank 0's running statistics are broadcast before every evaluation. Evaluation reads each rank's
contiguous block of the split, gathers the predictions and labels and computes AUC / log loss over the whole split
on every rank. Rank 0 alone writes the checkpoint, the log and ``metrics.json``; every rank resumes from the same
checkpoint. Dropout masks are per-rank (as under any DDP); without dropout a data-parallel run equals the
single-process run up to floating-point summation order.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import batches
from ..data.batching import shard_plan, subsplit
from . import distributed as dist_utils
from .callbacks import Callback
from .checkpoint import (CHECKPOINT_NAME, CHECKPOINT_VERSION, RESUME_HINT, RunFolderError, dataset_fingerprint,
                         fingerprint_diff, get_rng_state, load_checkpoint, save_checkpoint, seed_everything,
                         set_rng_state)
from .config import TrainConfig, append_log, monitor_score, save_json
from .metrics import Timer, embedding_stats, log_loss, roc_auc
from .optimizers import OPTIMIZERS, SPARSE_GRAD_OPTIMIZERS, MultiOptimizer, build_optimizer  # noqa: F401

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Train ``model`` on ``data`` (a :class:`~optembed_ext.data.CTRDataset`).

    Args:
        model: a :class:`~optembed_ext.models.CTRModel` (``model.embedding`` is an ``EmbeddingModule``).
        data: the dataset (``train``/``val``/``test`` splits).
        config: a :class:`TrainConfig`.
        run_dir: folder for ``checkpoint.pt``, ``log.txt`` and ``metrics.json`` (None: nothing is written and
            ``fit`` cannot resume).
        callbacks: :class:`Callback` objects (a method's search schedule).
        extra_param_groups: more optimizer parameter groups (dicts with ``params``; ``lr``/``weight_decay``
            default to the config's); their parameters are left out of "the rest of the model".

    Attributes useful to callbacks: ``model``, ``data``, ``config``, ``device``, ``optimizer``, ``global_step``,
    ``epoch`` (index of the running epoch, = number of finished epochs), ``step_in_epoch``, ``history``,
    ``stop_training``, ``current_batch``, ``log(msg)``, ``next_val_batch()``, ``evaluate(split)``.
    """

    def __init__(self, model: nn.Module, data, config: TrainConfig | None = None, run_dir=None,
                 callbacks: Iterable[Callback] = (), extra_param_groups: list[dict] | None = None):
        if config is None:
            config = TrainConfig()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not hasattr(model, "embedding"):
            raise TypeError("model must have an 'embedding' attribute (an optembed_ext.nn.EmbeddingModule)")
        for split in ("train", "val", "test"):
            if not hasattr(data, split):
                raise TypeError(f"data must have a {split!r} split (a CTRDataset)")
        if len(data.train) == 0:
            raise ValueError("data.train is empty")
        if config.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {config.optimizer!r}")
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r} requested but CUDA is not available")
        self.config = config
        self.model = model.to(self.device)
        self.data = data
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be Callback instances, got {type(cb).__name__}")
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        #: batch norms made synchronised (data parallel with ``config.sync_batch_norm``)
        self.synced_batch_norms = (dist_utils.sync_batch_norm(self.model, self.device)
                                   if self.world_size > 1 and config.sync_batch_norm else 0)
        self.optimizer = build_optimizer(self.model, self.config, extra_param_groups)
        self._ddp = None
        if self.world_size > 1:
            # the regularization term goes through the wrapped forward, so every parameter it touches is reduced;
            # find_unused_parameters: a method may leave parameters out of some steps (frozen masks, DARTS phases)
            self._ddp = dist_utils.SparseAwareDDP(_ForwardWithRegularization(self.model),
                                                  find_unused_parameters=True)
        #: data parallel: ``(positions, global_batch)``, the positions (LongTensor) inside the current global batch of
        #: the rows this rank holds; ``None`` in one process (the batch is the global batch)
        self.batch_shard: tuple[torch.Tensor, int] | None = None
        #: data parallel: ``(lo, hi)``, this rank's block of the training split (every training row it reads)
        self.data_shard: tuple[int, int] | None = None
        self._reset_state()

    # ---------------------------------------------------------------------------------------- setup
    def _reset_state(self) -> None:
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.epoch_times: list[float] = []
        self.best_val_auc = -math.inf
        self.best_val_logloss = math.nan
        self.best_score = -math.inf  # of config.monitor at the best epoch
        self.best_epoch = -1  # -1: no epoch yet (or, with best_state set, the state before training: keep_initial)
        self.initial_val: dict | None = None  # keep_initial: validation metrics of the state before training
        self.best_state: dict | None = None
        self.bad_epochs = 0
        self.stop_training = False
        self.finished = False
        self.result: dict | None = None
        self.current_batch = None
        self._epoch_loss_sum = 0.0
        self._epoch_seconds = 0.0
        self._val_cycle = 0
        self._val_pos = 0
        self._val_iter = None

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir is not None else None

    def log(self, msg: str) -> None:
        """Log a line to ``run_dir/log.txt`` and the ``optembed_ext.train.trainer`` logger (rank 0 only when data
        parallel)."""
        if self.rank != 0:
            logger.debug(msg)
            return
        logger.info(msg)
        append_log(self.run_dir, msg)

    # ----------------------------------------------------------------------------------------- data
    def _split(self, split):
        if isinstance(split, str):
            if split not in ("train", "val", "test"):
                raise ValueError(f"split must be 'train', 'val', 'test' or a CTRSplit, got {split!r}")
            return getattr(self.data, split)
        return split

    def _train_iter(self, epoch: int, skip: int):
        """``(iterator of (ids, labels, shard), number of steps)``; ``shard`` is ``None`` in one process, else the
        rank's ``(positions, global_batch)`` of the batch."""
        cfg = self.config
        n = len(self.data.train)
        if self.world_size > 1:
            # this rank's rows of every global batch, all from its block of the split (skipping a batch that would
            # leave some rank fewer than two rows: batch norm needs them)
            plan = shard_plan(n, cfg.batch_size, seed=cfg.seed, epoch=epoch, index=self.rank,
                              parts=self.world_size, min_rows=2)
            num = len(plan) if cfg.max_steps_per_epoch is None else min(len(plan), cfg.max_steps_per_epoch)
            self.data_shard = (plan.lo, plan.hi)
            it = ((ids, labels, (b.index, b.size)) for ids, labels, b in plan.read(self.data.train, skip, num))
            return it, num
        # a last batch of one sample breaks batch norm in training mode: drop it
        rem = n % cfg.batch_size
        drop_last = rem == 1 and n > rem
        num = n // cfg.batch_size if drop_last else math.ceil(n / cfg.batch_size)
        if cfg.max_steps_per_epoch is not None:
            num = min(num, cfg.max_steps_per_epoch)
        it = batches(self.data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, drop_last=drop_last)
        return ((ids, labels, None) for ids, labels in itertools.islice(it, skip, num)), num

    def next_val_batch(self):
        """The next validation batch ``(ids, labels)`` on the trainer's device, cycling (reshuffled each cycle)
        over the validation split; for DARTS-style architecture steps. Its position is checkpointed."""
        cfg = self.config
        if self._val_iter is None:
            it = batches(self.data.val, cfg.batch_size, shuffle=True, seed=cfg.seed + 1, epoch=self._val_cycle)
            self._val_iter = itertools.islice(it, self._val_pos, None)
        try:
            ids, labels = next(self._val_iter)
        except StopIteration:
            if self._val_pos == 0:
                raise ValueError("data.val is empty; next_val_batch() needs validation data") from None
            self._val_cycle += 1
            self._val_pos = 0
            self._val_iter = iter(batches(self.data.val, cfg.batch_size, shuffle=True, seed=cfg.seed + 1,
                                          epoch=self._val_cycle))
            ids, labels = next(self._val_iter)
        self._val_pos += 1
        return ids.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, split="val") -> dict:
        """AUC and log loss of the model over a whole split, plus timing.

        Returns ``{"auc", "logloss", "seconds", "seconds_per_batch", "num_batches", "num_samples"}``; ``auc`` is
        NaN when the split holds a single class.
        """
        split = self._split(split)
        self.optimizer.catch_up()  # lazy weight decay: the rows evaluated carry every decay step so far
        was_training = self.model.training
        self.model.eval()
        full = split
        if self.world_size > 1:  # this rank's contiguous block (read only there); predictions and labels gathered
            if not self.synced_batch_norms:
                dist_utils.broadcast_batch_norm_stats(self.model)  # every rank evaluates rank 0's model
            lo, hi = dist_utils.shard_bounds(len(full))
            split = subsplit(full, lo, hi)
        probs, labels = [], []
        num_batches = 0
        sync = self.device.type == "cuda"
        with Timer() as timer:
            for ids, y_batch in batches(split, self.config.eval_batch_size):
                logits = self.model(ids.to(self.device, non_blocking=True))
                probs.append(torch.sigmoid(logits.float()).to("cpu", torch.float64))
                labels.append(y_batch)
                num_batches += 1
            if sync:
                torch.cuda.synchronize(self.device)
        self.model.train(was_training)
        y = torch.cat(labels).numpy().astype(np.float64) if labels else np.zeros(0, dtype=np.float64)
        p = torch.cat(probs).numpy() if probs else np.zeros(0, dtype=np.float64)
        if self.world_size > 1:
            counts = [hi - lo for lo, hi in (dist_utils.shard_bounds(len(full), self.world_size, r)
                                             for r in range(self.world_size))]
            p, y = dist_utils.gather_rows(p, counts), dist_utils.gather_rows(y, counts)
            num_batches = int(dist_utils.all_reduce_sum([num_batches])[0])
        if num_batches == 0:
            return {"auc": math.nan, "logloss": math.nan, "seconds": timer.seconds, "seconds_per_batch": math.nan,
                    "num_batches": 0, "num_samples": 0}
        auc = roc_auc(y, p) if y.min() != y.max() else math.nan
        return {"auc": auc, "logloss": log_loss(y, p), "seconds": timer.seconds,
                "seconds_per_batch": timer.seconds / num_batches, "num_batches": num_batches,
                "num_samples": int(len(y))}

    # ------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "rng": get_rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_loss_sum": self._epoch_loss_sum,
            "epoch_seconds": self._epoch_seconds,
            "history": copy.deepcopy(self.history),
            "epoch_times": list(self.epoch_times),
            "best": {"val_auc": self.best_val_auc, "val_logloss": self.best_val_logloss, "epoch": self.best_epoch,
                     "state": self.best_state},
            "bad_epochs": self.bad_epochs,
            "initial_val": self.initial_val,
            "stop_training": self.stop_training,
            "finished": self.finished,
            "result": self.result,
            "val_cursor": (self._val_cycle, self._val_pos),
            "config": self.config.to_dict(),
            "data": self._data_fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if len(state["callbacks"]) != len(self.callbacks):
            raise ValueError(f"checkpoint holds {len(state['callbacks'])} callback states, the trainer has "
                             f"{len(self.callbacks)} callbacks")
        for cb, s in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(s)
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        self._epoch_loss_sum = state["epoch_loss_sum"]
        self._epoch_seconds = state["epoch_seconds"]
        self.history = copy.deepcopy(state["history"])
        self.epoch_times = list(state["epoch_times"])
        best = state["best"]
        self.best_val_auc, self.best_val_logloss = best["val_auc"], best["val_logloss"]
        self.best_epoch, self.best_state = best["epoch"], best["state"]
        # the score of the stored best epoch (or kept initial state) under this run's monitor
        self.best_score = (monitor_score(self.config.monitor, self.best_val_auc, self.best_val_logloss)
                           if self.best_state is not None else -math.inf)
        self.bad_epochs = state["bad_epochs"]
        self.initial_val = state.get("initial_val")
        self.stop_training = state["stop_training"]
        self.finished = state["finished"]
        self.result = state["result"]
        self._val_cycle, self._val_pos = state["val_cursor"]
        self._val_iter = None
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        """Write ``run_dir/checkpoint.pt`` atomically (no-op without a run_dir, and on ranks other than 0)."""
        if self.checkpoint_path is not None:
            self.optimizer.catch_up()  # on every rank: the saved (and resumed) table has no pending decay
        if self.checkpoint_path is not None and self.rank == 0:
            save_checkpoint(self.checkpoint_path, self.state_dict())

    # ------------------------------------------------------------------------------------------ fit
    @contextlib.contextmanager
    def _determinism(self):
        if not self.config.deterministic:
            yield
            return
        previous = torch.are_deterministic_algorithms_enabled()
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous)

    def fit(self, resume: bool = True) -> dict:
        """Train (early stopping on the monitored validation score), restore the best state, evaluate the test
        split.

        With ``resume`` and an existing ``run_dir/checkpoint.pt`` training continues where it stopped (a finished
        run returns its stored result). Returns the result dict (also written to ``run_dir/metrics.json``).
        """
        cfg = self.config
        path = self.checkpoint_path
        # data parallel: rank 0 decides, so that every rank resumes (or starts) together
        resuming = dist_utils.broadcast_object(bool(resume and path is not None and path.exists()))
        with self._determinism():
            if not resuming:
                self._reset_state()
                seed_everything(cfg.seed)
            for cb in self.callbacks:
                cb.on_train_begin(self)
            if resuming:
                state = load_checkpoint(path, map_location=self.device)
                self._check_resumable(state.get("config", {}), state.get("data"))
                self.load_state_dict(state)
                self.log(f"resumed from {path} at epoch {self.epoch} step {self.step_in_epoch}")
                if self.finished:
                    return self.result
            else:
                self.log(f"start training: {type(self.model).__name__} with {type(self.model.embedding).__name__}, "
                         f"config {cfg.to_dict()}")
                if cfg.keep_initial:
                    self._score_initial_state()
            while self.epoch < cfg.epochs and not self.stop_training:
                self._run_epoch()
            return self._finish()

    def _score_initial_state(self) -> None:
        """keep_initial: the state before training becomes the best so far (epoch -1) when its monitored validation
        score is a number; the epochs must beat it."""
        val = self.evaluate("val")
        self.initial_val = {"auc": val["auc"], "logloss": val["logloss"]}
        score = monitor_score(self.config.monitor, val["auc"], val["logloss"])
        self.log(f"initial state: val_auc {val['auc']:.6f} val_logloss {val['logloss']:.6f}")
        if score > self.best_score:  # False for NaN
            self._take_best(val, score, epoch=-1)

    def _take_best(self, val: dict, score: float, epoch: int) -> None:
        """Record ``epoch`` (-1: the state before training) as the best so far, with a CPU copy of the model."""
        self.best_val_auc, self.best_val_logloss, self.best_score = val["auc"], val["logloss"], score
        self.best_epoch = epoch
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    #: config fields that must match the checkpoint's for a resumed run to continue the same training
    RESUME_KEYS = ("batch_size", "lr", "embedding_lr", "weight_decay", "optimizer", "momentum", "seed",
                   "max_steps_per_epoch", "grad_clip", "threshold_optimizer", "threshold_lr", "monitor",
                   "keep_initial")

    def _data_fingerprint(self) -> dict:
        if getattr(self, "_data_fp", None) is None:
            self._data_fp = dataset_fingerprint(self.data)
        return self._data_fp

    def _check_resumable(self, saved: dict, saved_data: dict | None = None) -> None:
        current = self.config.to_dict()
        diff = [k for k in self.RESUME_KEYS if k in saved and saved[k] != current[k]]
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved[k]!r} vs config {current[k]!r}" for k in diff)
            raise RunFolderError(f"cannot resume from {self.checkpoint_path}: the training configuration differs "
                                 f"({detail}); use another run_dir or fit(resume=False) ({RESUME_HINT})")
        if saved_data is not None:
            diff = fingerprint_diff(saved_data, self._data_fingerprint())
            if diff:
                raise RunFolderError(f"cannot resume from {self.checkpoint_path}: the data differ from the data it "
                                     f"was trained on ({'; '.join(diff[:4])}), e.g. another split seed, row limit "
                                     f"or preprocessing; use another run_dir or fit(resume=False) ({RESUME_HINT})")

    def _run_epoch(self) -> None:
        cfg = self.config
        epoch = self.epoch
        it, num = self._train_iter(epoch, self.step_in_epoch)
        if num == 0:
            raise ValueError(f"no training batch: {len(self.data.train)} samples, batch_size {cfg.batch_size}")
        model, optimizer, emb = self.model, self.optimizer, self.model.embedding
        ddp = self._ddp
        model.train()
        progress = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm
            progress = tqdm(total=num, initial=self.step_in_epoch, desc=f"epoch {epoch}", leave=False)
        start = time.perf_counter()
        seconds_before = self._epoch_seconds
        for ids, labels, shard in it:
            ids = ids.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            self.current_batch = (ids, labels)
            self.batch_shard = shard
            global_batch = ids.shape[0] if shard is None else shard[1]
            model.train()
            for cb in self.callbacks:
                cb.on_batch_begin(self, ids, labels)
            optimizer.zero_grad(set_to_none=True)
            if ddp is None:
                logits = model(ids)
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype)) + emb.regularization()
                loss.backward()
            else:
                ddp.train()
                logits, reg = ddp(ids)
                bce_sum = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum")
                # DDP averages over ranks: sum / global batch * world size averages to the global batch's mean
                (bce_sum * (self.world_size / global_batch) + reg).backward()
                total = dist_utils.all_reduce_sum([float(bce_sum.detach())])[0]
                loss = torch.as_tensor(total / global_batch + float(reg.detach()))
            for cb in self.callbacks:
                cb.on_after_backward(self)
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()
            self.global_step += 1
            self.step_in_epoch += 1
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at epoch {epoch} step "
                                         f"{self.step_in_epoch}")
            self._epoch_loss_sum += loss_value
            for cb in self.callbacks:
                cb.on_batch_end(self, loss_value)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if cfg.checkpoint_every is not None and self.global_step % cfg.checkpoint_every == 0 \
                    and self.step_in_epoch < num:
                self._epoch_seconds = seconds_before + time.perf_counter() - start
                self.save_checkpoint()
        if progress is not None:
            progress.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_seconds = seconds_before + time.perf_counter() - start
        train_loss = self._epoch_loss_sum / max(self.step_in_epoch, 1)

        val = self.evaluate("val")
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch, val)
        score = monitor_score(cfg.monitor, val["auc"], val["logloss"])
        improved = score > self.best_score  # False for NaN
        if improved:
            self._take_best(val, score, epoch)
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
            if cfg.patience is not None and self.bad_epochs >= cfg.patience:
                self.stop_training = True
        stats = embedding_stats(emb)
        record = {"epoch": epoch, "train_loss": train_loss, "val_auc": val["auc"], "val_logloss": val["logloss"],
                  "train_seconds": train_seconds, "val_seconds": val["seconds"], "steps": self.step_in_epoch,
                  **stats}
        self.history.append(record)
        self.epoch_times.append(train_seconds)
        self.log(f"epoch {epoch}: train_loss {train_loss:.6f} val_auc {val['auc']:.6f} "
                 f"val_logloss {val['logloss']:.6f} params {stats['num_params']} sparsity {stats['sparsity']:.4f} "
                 f"time {train_seconds:.2f}s" + ("" if improved else f" (no improvement {self.bad_epochs})"))
        if self.stop_training and self.epoch + 1 < cfg.epochs:
            self.log(f"early stop after epoch {epoch} (best epoch {self.best_epoch})")
        self.epoch += 1
        self.step_in_epoch = 0
        self._epoch_loss_sum = 0.0
        self._epoch_seconds = 0.0
        self.save_checkpoint()

    def _finish(self) -> dict:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        test = self.evaluate("test")
        emb = self.model.embedding
        stats = embedding_stats(emb)
        times = self.epoch_times
        self.result = {
            "best_epoch": self.best_epoch,
            "best_val_auc": self.best_val_auc if self.best_state is not None else math.nan,
            "best_val_logloss": self.best_val_logloss,
            "monitor": self.config.monitor,
            "kept_initial": bool(self.best_epoch < 0 and self.best_state is not None),
            "initial_val_auc": self.initial_val["auc"] if self.initial_val else None,
            "initial_val_logloss": self.initial_val["logloss"] if self.initial_val else None,
            "test_auc": test["auc"],
            "test_logloss": test["logloss"],
            "epochs_run": self.epoch,
            "stopped_early": bool(self.stop_training and self.epoch < self.config.epochs),
            "global_step": self.global_step,
            "epoch_times": list(times),
            "mean_epoch_seconds": float(np.mean(times)) if times else math.nan,
            "inference_seconds_per_batch": test["seconds_per_batch"],
            "eval_batch_size": self.config.eval_batch_size,
            "test_eval_seconds": test["seconds"],
            **stats,
            "dense_params": int(emb.dense_size()) if hasattr(emb, "dense_size") else None,
            "model_params": int(sum(p.numel() for p in self.model.parameters())),
            "history": copy.deepcopy(self.history),
        }
        for cb in self.callbacks:
            cb.on_train_end(self)
        self.finished = True
        self.log(f"finished: best epoch {self.best_epoch} val_auc {self.result['best_val_auc']:.6f} "
                 f"test_auc {test['auc']:.6f} test_logloss {test['logloss']:.6f} params {stats['num_params']} "
                 f"sparsity {stats['sparsity']:.4f}")
        self.save_checkpoint()
        if self.run_dir is not None and self.rank == 0:
            save_json(self.run_dir / "metrics.json", self.result)
        return self.result


class _ForwardWithRegularization(nn.Module):
    """``ids -> (logits, model.embedding.regularization())``: the module DistributedDataParallel wraps, so that the
    parameters of the regularization term are reduced with the others."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor):
        return self.model(ids), self.model.embedding.regularization()
