"""OptEmbed as a registered method: the pipeline of :mod:`.pipeline` with the comparison's shared settings."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from ...nn.optembed import OptEmbedEmbedding
from ...results import MethodResult, build_retrained_model, load_search_result
from ..base import Method, register_method
from ..common import RunSettings
from .config import OptEmbedConfig
from .pipeline import run_optembed

log = logging.getLogger(__name__)


def shared_options(settings: RunSettings) -> dict:
    """The :class:`OptEmbedConfig` fields a comparison shares with every method."""
    tc = settings.train
    return {"embed_dim": settings.embed_dim, "model_cfg": dict(settings.model_cfg), "lr": tc.lr,
            "weight_decay": tc.weight_decay, "batch_size": tc.batch_size, "eval_batch_size": tc.eval_batch_size,
            "optimizer": tc.optimizer, "epochs": tc.epochs, "patience": tc.patience, "monitor": tc.monitor,
            "max_steps_per_epoch": tc.max_steps_per_epoch, "seed": tc.seed, "device": tc.device,
            "progress": False, "baseline": False, "threshold_optimizer": tc.threshold_optimizer}


#: the row variant of each pipeline variant: OptEmbed, without retraining, and with ``ablations`` OptEmbed-E (row
#: pruning only) and OptEmbed-D (field dims only)
VARIANT_NAMES = {"optembed": "retrain", "no_retrain": "no-retrain", "optembed_e": "E (rows only)",
                 "optembed_d": "D (dims only)"}


def _search_seconds(variant: dict, phase_seconds: dict, default: float) -> float:
    """Seconds of the variant's search phases (its supernet and evolution, not its retraining)."""
    names = [p for p in variant.get("phases") or [] if not p.startswith("retrain")]
    if not names:
        return default
    return float(sum(float(phase_seconds.get(p, 0.0)) for p in names))


@register_method
class OptEmbed(Method):
    """OptEmbed (Lyu et al., CIKM 2022): supernet, evolutionary search, retraining, compact export.

    Its configuration holds the training settings too; in a comparison the shared settings fill them and the
    method's mapping overrides any field. Run alone with ``optembed search``."""

    name = "optembed"
    title = "OptEmbed"
    config_class = OptEmbedConfig
    help = "OptEmbed: supernet, evolutionary search, retraining, report"
    command = None  # `optembed search` (its options are the OptEmbedConfig fields)

    @classmethod
    def config_from_dict(cls, values: dict) -> OptEmbedConfig:
        return OptEmbedConfig.from_dict(dict(values or {}))

    @classmethod
    def from_options(cls, options: dict | None, settings: RunSettings) -> "OptEmbed":
        return cls(OptEmbedConfig.from_dict({**shared_options(settings), **dict(options or {})}))

    def build_embedding(self, feature_map, embed_dim: int | None = None) -> OptEmbedEmbedding:
        """The supernet's table (``embed_dim`` defaults to the config's)."""
        c = self.config
        return OptEmbedEmbedding(feature_map, c.embed_dim if embed_dim is None else int(embed_dim), norm=c.norm,
                                 alpha=c.alpha, threshold_lr=c.threshold_lr, threshold_init=c.threshold_init,
                                 threshold_mode=c.threshold_mode, oov=c.oov)

    def run(self, data, model_name: str, settings: RunSettings | None = None, run_dir=None) -> MethodResult:
        """The pipeline in ``run_dir/optembed``; rows ``retrain`` (OptEmbed) and ``no-retrain``, and with
        ``ablations`` the OptEmbed-E and OptEmbed-D rows."""
        from ...train.trainer import Trainer

        config = self.config
        out = Path(run_dir) if run_dir is not None else Path("runs") / "optembed"
        result = run_optembed(data, model_name, config, out_dir=out / "optembed", log=log.info)
        variants = result.get("variants", {})
        phase_s = result.get("phase_seconds", {})
        search_s = float(sum(v for k, v in phase_s.items() if k in ("supernet", "evolution")))
        rows = []
        infer = math.nan
        if config.retrain and "optembed" in variants:
            # inference time of the retrained model, measured exactly as for the other methods
            model = build_retrained_model(load_search_result(out / "optembed"))
            trainer = Trainer(model, data, config.train_config(config.epochs))
            infer = float(trainer.evaluate("test")["seconds"])
        for name in ("optembed", "no_retrain", "optembed_e", "optembed_d"):
            v = variants.get(name)
            if not v:
                continue
            rows.append({
                "method": "optembed", "variant": VARIANT_NAMES[name],
                "auc": v.get("test_auc"), "logloss": v.get("test_logloss"), "num_params": v.get("params"),
                "sparsity": v.get("sparsity"), "memory_bytes": v.get("bytes"),
                "train_seconds": float(v.get("seconds", math.nan)),
                "search_seconds": _search_seconds(v, phase_s, search_s),
                "infer_seconds": infer if name == "optembed" else math.nan,
                "field_dims": result.get("field_dims") if name in ("optembed", "no_retrain") else None,
            })
        search = {k: result.get(k) for k in ("field_dims", "kept_rows_per_field", "phase_seconds", "evolution")}
        return MethodResult(rows=rows, search=search)

    def to_compact(self, run_dir):
        from ...export import export_compact

        return export_compact(Path(run_dir) / "optembed" if (Path(run_dir) / "optembed").is_dir() else run_dir)
