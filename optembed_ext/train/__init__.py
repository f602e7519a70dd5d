"""Training: one trainer for every model and embedding method, metrics, checkpoints, callbacks."""
from .callbacks import Callback, LambdaCallback
from .checkpoint import load_checkpoint, save_checkpoint, seed_everything
from .config import TrainConfig, load_yaml_config, make_run_dir, save_json, save_yaml
from .metrics import Timer, embedding_stats, log_loss, roc_auc
from .trainer import OPTIMIZERS, MultiOptimizer, Trainer

__all__ = [
    "Callback", "LambdaCallback", "TrainConfig", "Trainer", "MultiOptimizer", "OPTIMIZERS", "roc_auc", "log_loss",
    "embedding_stats", "Timer", "load_checkpoint", "save_checkpoint", "seed_everything", "load_yaml_config",
    "make_run_dir", "save_json", "save_yaml",
]
