"""The OptEmbed pipeline (Lyu et al., CIKM 2022): supernet -> evolutionary search -> retraining -> export.

- :mod:`.config`: :class:`OptEmbedConfig`, every setting of a run;
- :mod:`.callbacks`: the supernet's per-batch dimension sampling and best-epoch row mask;
- :mod:`.pipeline`: :class:`OptEmbedRun` / :func:`run_optembed`, the resumable phases in one run folder;
- :mod:`.method`: the registered :class:`OptEmbed` method (what ``compare`` runs).
"""
from ...results import RESULT_FILE, build_retrained_model, load_search_result
from .callbacks import OptEmbedSupernetCallback, WallTimeCallback
from .config import ABLATION_SUPERNETS, RETRAIN_INITS, OptEmbedConfig
from .method import OptEmbed
from .pipeline import (OptEmbedRun, build_optembed_model, build_uniform_model, embedding_stats, evaluate_model,
                       run_optembed)

__all__ = [
    "ABLATION_SUPERNETS", "OptEmbed", "OptEmbedConfig", "OptEmbedRun", "OptEmbedSupernetCallback", "RESULT_FILE",
    "RETRAIN_INITS", "WallTimeCallback", "build_optembed_model", "build_retrained_model", "build_uniform_model",
    "embedding_stats", "evaluate_model", "load_search_result", "run_optembed",
]
