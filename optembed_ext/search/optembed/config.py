"""Settings of an OptEmbed run (:class:`OptEmbedConfig`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ...train.config import MONITORS, dataclass_from_dict
from ...nn.optembed import THRESHOLD_MODES
from ..evolution import EvolutionConfig

#: initial weights of the retraining: the supernet's initial weights (lottery ticket, the paper's), new random
#: weights, or the supernet's trained weights (warm start)
RETRAIN_INITS = ("lottery", "fresh", "supernet")
ABLATION_SUPERNETS = ("separate", "shared")
#: settings added after run folders existed, with the defaults that reproduce the earlier behaviour: left out of
#: run fingerprints at these values, so that folders made before them still resume
LATER_DEFAULTS = {"monitor": "auc", "retrain_monitor": None, "retrain_keep_initial": False}


def without_later_defaults(config: dict) -> dict:
    """``config`` (an OptEmbedConfig or a comparison's settings as a dict) without the :data:`LATER_DEFAULTS` fields
    at their defaults."""
    return {k: v for k, v in config.items() if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


# =========================================================================== configuration
@dataclass
class OptEmbedConfig:
    """All settings of an OptEmbed run (defaults: the OptEmbed reference code).

    Training settings apply to every trained phase (uniform, supernets, retraining); ``supernet_epochs`` /
    ``retrain_epochs`` override ``epochs`` for one kind of phase. ``patience`` is the early-stopping patience on
    the validation score of ``monitor`` (AUC by default, as the reference code, which stops at the first epoch
    without improvement: 1); ``retrain_monitor`` (``None`` = ``monitor``) picks the retraining's best epoch by
    another metric, e.g. ``logloss`` when the retrained model's calibration matters. ``retrain_keep_initial``: the
    retraining's starting state competes with its epochs (with ``retrain_init: supernet`` that is the model
    without retraining, so the retraining is kept only where it improves the monitored validation score).
    ``optimizer`` is any trainer optimizer; the fused row-sparse ones (``fused_adam``, ``fused_adagrad``,
    ``fused_sgd``) switch the OptEmbed table (and the uniform baseline's) to sparse gradients, so only the
    looked-up rows are updated.
    """

    # embedding / backbone
    embed_dim: int = 64
    model_cfg: dict = field(default_factory=dict)
    # supernet (row pruning)
    norm: int = 1
    alpha: float = 3e-4
    threshold_lr: float = 3e-4
    threshold_optimizer: str = "sgd"   # the authors': plain SGD for the thresholds, Adam for everything else
    threshold_init: float = 0.0
    threshold_mode: str = "field"      # one threshold per field (the paper) or per feature value ("feature")
    oov: bool = False
    # training
    lr: float = 1e-4
    weight_decay: float = 5e-5
    batch_size: int = 2048
    eval_batch_size: int = 8192
    optimizer: str = "adam"
    epochs: int = 30
    supernet_epochs: int | None = None
    retrain_epochs: int | None = None
    patience: int | None = 1
    monitor: str = "auc"
    retrain_monitor: str | None = None
    retrain_keep_initial: bool = False
    max_steps_per_epoch: int | None = None
    seed: int = 2022
    device: str = "cpu"
    progress: bool = False
    # evolutionary search
    generations: int = 30
    mutation_num: int = 10
    crossover_num: int = 10
    keep_num: int = 0
    m_prob: float = 0.1
    top_k: int | None = None
    top_k_memory: bool = False     # with top_k: parents from the best top_k of all generations (Algorithm 1)
    evo_seed: int = 0
    evo_batch_size: int = 4096
    max_stack_rows: int | None = None
    measure_speedup: bool = True
    # retraining
    retrain_init: str = "lottery"
    # what to run
    baseline: bool = True
    retrain: bool = True
    ablations: bool = False
    ablation_supernets: str = "separate"
    export: bool = True

    def __post_init__(self):
        if self.retrain_init not in RETRAIN_INITS:
            raise ValueError(f"retrain_init must be one of {RETRAIN_INITS}, got {self.retrain_init!r}")
        if self.ablation_supernets not in ABLATION_SUPERNETS:
            raise ValueError(f"ablation_supernets must be one of {ABLATION_SUPERNETS}, "
                             f"got {self.ablation_supernets!r}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {self.threshold_mode!r}")
        if self.norm not in (1, 2):
            raise ValueError(f"norm must be 1 or 2, got {self.norm!r}")
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if not isinstance(self.model_cfg, dict):
            raise ValueError(f"model_cfg must be a mapping, got {type(self.model_cfg).__name__}")
        for name in ("supernet_epochs", "retrain_epochs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        self.evolution_config()  # validates the search settings
        self.train_config(self.epochs)  # validates the training settings
        if not isinstance(self.retrain_keep_initial, bool):
            raise ValueError(f"retrain_keep_initial must be a bool, got {self.retrain_keep_initial!r}")
        if self.retrain_monitor is not None and self.retrain_monitor not in MONITORS:
            raise ValueError(f"retrain_monitor must be one of {MONITORS} or None, got {self.retrain_monitor!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "OptEmbedConfig":
        """Build from a dict (keys may use ``-`` or ``_``); unknown keys raise ValueError naming them."""
        return dataclass_from_dict(cls, values, "OptEmbed config key")

    def to_dict(self) -> dict:
        return asdict(self)

    def train_config(self, epochs: int, retrain: bool = False):
        """The trainer settings of a phase; ``retrain``: a retraining phase (``retrain_monitor`` and
        ``retrain_keep_initial`` apply)."""
        from ...train.config import TrainConfig

        monitor = self.retrain_monitor if retrain and self.retrain_monitor is not None else self.monitor
        keep_initial = bool(retrain and self.retrain_keep_initial)
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                           lr=self.lr, weight_decay=self.weight_decay, optimizer=self.optimizer,
                           patience=self.patience, monitor=monitor, keep_initial=keep_initial, seed=self.seed,
                           device=self.device, progress=self.progress, max_steps_per_epoch=self.max_steps_per_epoch,
                           threshold_optimizer=self.threshold_optimizer, threshold_lr=self.threshold_lr)

    def evolution_config(self) -> EvolutionConfig:
        return EvolutionConfig(generations=self.generations, mutation_num=self.mutation_num,
                               crossover_num=self.crossover_num, keep_num=self.keep_num, m_prob=self.m_prob,
                               top_k=self.top_k, top_k_memory=self.top_k_memory, seed=self.evo_seed,
                               eval_batch_size=self.evo_batch_size,
                               max_stack_rows=self.max_stack_rows)
