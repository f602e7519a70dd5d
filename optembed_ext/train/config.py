"""Training configuration (a dataclass, loadable from YAML) and run-folder helpers."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml


def dataclass_from_dict(cls, values: dict, what: str):
    """``cls(**values)`` for a config dataclass; keys may use ``-`` or ``_``; keys that are not fields raise
    ValueError ``unknown <what>(s) [...]; known: [...]``."""
    names = {f.name for f in fields(cls)}
    norm = {str(k).replace("-", "_"): v for k, v in dict(values or {}).items()}
    unknown = set(norm) - names
    if unknown:
        raise ValueError(f"unknown {what}(s) {sorted(unknown)}; known: {sorted(names)}")
    return cls(**norm)


#: optimizers of learned pruning thresholds (TrainConfig.threshold_optimizer)
THRESHOLD_OPTIMIZERS = ("sgd", "adam")
#: validation metrics that choose the best epoch and drive early stopping (TrainConfig.monitor); higher score is
#: better: ``auc``, ``logloss`` (score -logloss), ``auc-logloss`` (score AUC - logloss, FuxiCTR's default monitor)
MONITORS = ("auc", "logloss", "auc-logloss")


def monitor_score(monitor: str, auc: float, logloss: float) -> float:
    """The score (higher is better) of validation metrics under ``monitor`` (see :data:`MONITORS`); NaN when a
    metric it uses is NaN."""
    if monitor == "auc":
        return float(auc)
    if monitor == "logloss":
        return -float(logloss)
    if monitor == "auc-logloss":
        return float(auc) - float(logloss)
    raise ValueError(f"monitor must be one of {MONITORS}, got {monitor!r}")


@dataclass
class TrainConfig:
    """Everything the :class:`~optembed_ext.train.Trainer` needs besides the model and the data.

    ``optimizer`` names an entry of :data:`optembed_ext.train.trainer.OPTIMIZERS` (``adam``, ``sparse_adam``,
    ``adagrad``, ``sgd``, and the fused sparse optimizers ``fused_sgd``, ``fused_adagrad``, ``fused_adam`` that
    update only the touched rows of the embedding table, and ``fused_bwd_sgd``, ``fused_bwd_adagrad``,
    ``fused_bwd_adam`` that apply that update inside the lookup's backward, see :mod:`optembed_ext.optim`; each
    fused name with the suffix ``_lazywd`` also decays the rows a step does not touch, on their next update and
    before every evaluation and checkpoint, as dense weight decay would);
    parameters with sparse gradients get the sparse variant (SparseAdam for adam).
    ``embedding_lr``: learning rate of the embedding module's parameter groups (``None`` = ``lr``); row-wise
    Adagrad and SGD tables usually want a larger one than the dense layers.
    ``monitor``: the validation metric that picks the best epoch (whose state is restored before the test
    evaluation) and drives early stopping: ``"auc"``, ``"logloss"`` or ``"auc-logloss"`` (see :data:`MONITORS`).
    ``patience``: epochs without a better monitored score before stopping (``None`` = never stop early).
    ``keep_initial``: the state before the first epoch competes with the epochs for the best validation score, so
    a fine-tuning that only makes a warm-started model worse returns the starting state (the result's
    ``best_epoch`` is then -1 and ``kept_initial`` true).
    ``checkpoint_every``: also checkpoint every that many steps inside an epoch (``None`` = once per epoch).
    ``max_steps_per_epoch``: cut each epoch after that many steps (``None`` = whole training split).
    ``threshold_optimizer``: optimizer of learned pruning thresholds (OptEmbed's ``t``): ``"sgd"`` (plain SGD, as
    the OptEmbed authors train them) or ``"adam"``; ``threshold_lr`` its learning rate (``None`` = the module's
    ``threshold_lr``). The thresholds never get weight decay.
    ``sync_batch_norm``: under data parallelism (more than one rank), batch norm normalises with the statistics of
    the whole global batch (as one process does) instead of each rank's share (no effect in one process).
    """

    epochs: int = 10
    batch_size: int = 2048
    eval_batch_size: int = 8192
    lr: float = 1e-3
    embedding_lr: float | None = None
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.0
    patience: int | None = 2
    monitor: str = "auc"
    keep_initial: bool = False
    seed: int = 2022
    deterministic: bool = False
    device: str = "cpu"
    progress: bool = True
    max_steps_per_epoch: int | None = None
    grad_clip: float | None = None
    checkpoint_every: int | None = None
    threshold_optimizer: str = "sgd"
    threshold_lr: float | None = None
    sync_batch_norm: bool = True

    def __post_init__(self):
        def positive_int(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        for name in ("epochs", "batch_size", "eval_batch_size"):
            positive_int(name)
        for name in ("max_steps_per_epoch", "checkpoint_every"):
            positive_int(name, allow_none=True)
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int)
                                          or self.patience < 0):
            raise ValueError(f"patience must be a non-negative int or None, got {self.patience!r}")
        for name in ("lr", "weight_decay", "momentum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.embedding_lr is not None and (isinstance(self.embedding_lr, bool)
                                              or not isinstance(self.embedding_lr, (int, float))
                                              or not math.isfinite(self.embedding_lr) or self.embedding_lr <= 0):
            raise ValueError(f"embedding_lr must be a finite number > 0 or None, got {self.embedding_lr!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")
        if self.threshold_optimizer not in THRESHOLD_OPTIMIZERS:
            raise ValueError(f"threshold_optimizer must be one of {THRESHOLD_OPTIMIZERS}, got "
                             f"{self.threshold_optimizer!r}")
        if self.threshold_lr is not None and (isinstance(self.threshold_lr, bool)
                                              or not isinstance(self.threshold_lr, (int, float))
                                              or not math.isfinite(self.threshold_lr) or self.threshold_lr < 0):
            raise ValueError(f"threshold_lr must be a finite number >= 0 or None, got {self.threshold_lr!r}")
        if not isinstance(self.keep_initial, bool):
            raise ValueError(f"keep_initial must be a bool, got {self.keep_initial!r}")
        if not isinstance(self.sync_batch_norm, bool):
            raise ValueError(f"sync_batch_norm must be a bool, got {self.sync_batch_norm!r}")
        if not isinstance(self.optimizer, str):
            raise ValueError(f"optimizer must be a string, got {self.optimizer!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict (keys may use ``-`` or ``_``); unknown keys raise ValueError naming them."""
        return dataclass_from_dict(cls, values, "TrainConfig key")

    @classmethod
    def from_yaml(cls, path) -> "TrainConfig":
        return cls.from_dict(load_yaml_config(path))


def load_yaml_config(path) -> dict:
    """Read a YAML mapping (``{}`` for an empty file); raise ValueError if it is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        values = yaml.safe_load(fh)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a YAML mapping, got {type(values).__name__}")
    return values


def _plain(value):
    """Make a value YAML/JSON friendly (tuples -> lists, paths -> str)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def make_run_dir(out=None, name: str = "run", root="runs") -> Path:
    """Create and return the run folder: ``out`` if given, else ``root/<name>-<UTC time>``."""
    if out is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        out = Path(root) / f"{name}-{stamp}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


#: files and folders a run writes; :func:`clear_run_dir` removes only these
RUN_FOLDER_MARKERS = ("config.yaml", "log.txt", "metrics.json", "fingerprint.json", "checkpoint.pt")


def clear_run_dir(run_dir) -> Path:
    """Empty a run folder to start it over. Refuses a folder that does not look like a run folder (none of
    :data:`RUN_FOLDER_MARKERS`), so a mistyped ``--out`` never deletes other files."""
    import shutil

    run_dir = Path(run_dir)
    if not run_dir.exists():
        return run_dir
    entries = list(run_dir.iterdir())
    if entries and not any((run_dir / m).exists() for m in RUN_FOLDER_MARKERS) and \
            not (run_dir / "phases").is_dir():
        from .checkpoint import RunFolderError

        raise RunFolderError(f"{run_dir} is not empty and is not a run folder, so it is not emptied; choose "
                             f"another --out")
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()
    return run_dir


def _writes() -> bool:
    """Run-folder files are written by one process: rank 0 under torchrun, the process itself otherwise."""
    from .distributed import is_main

    return is_main()


def _atomic_write_text(path: Path, text: str) -> None:
    if not _writes():
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def append_log(run_dir, msg: str) -> None:
    """Append a time-stamped line to ``run_dir/log.txt`` (no-op when ``run_dir`` is None)."""
    if run_dir is None or not _writes():
        return
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    with open(Path(run_dir) / "log.txt", "a", encoding="utf-8") as fh:
        fh.write(f"{stamp} {msg}\n")


def save_yaml(path, values: dict) -> None:
    """Write a mapping as YAML (long option names as keys), atomically."""
    _atomic_write_text(Path(path), yaml.safe_dump(_plain(values), sort_keys=False))


def save_json(path, values: dict) -> None:
    """Write a mapping as indented JSON, atomically (NaN written as null)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    _atomic_write_text(Path(path), json.dumps(clean(_plain(values)), indent=2) + "\n")
