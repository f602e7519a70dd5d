"""Quotient-remainder compositional embeddings (Shi et al., KDD 2020) on the shared trainer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..nn.qr import OPERATIONS, QREmbedding
from ..results import MethodResult
from .base import Method, register_method
from .common import RunSettings, make_row, seed_everything, train_and_evaluate


@dataclass
class QRConfig:
    """Settings of the QR runs: one trained model per entry of ``collisions`` (every field hashed alike) plus,
    when ``field_collisions`` is given (``{field_name: c}``, fields not named keep a full table), one model with
    those per-field collisions."""

    collisions: list[int] = field(default_factory=lambda: [2, 4, 8])
    operation: str = "mult"
    min_cardinality: int = 0
    field_collisions: dict | None = None

    def __post_init__(self):
        if isinstance(self.collisions, int):
            self.collisions = [self.collisions]
        if not self.collisions or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                      for c in self.collisions):
            raise ValueError(f"collisions must be positive ints, got {self.collisions!r}")
        if self.operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, got {self.operation!r}")
        if self.field_collisions is not None and not isinstance(self.field_collisions, dict):
            raise ValueError(f"field_collisions must be a mapping {{field_name: collisions}}, "
                             f"got {self.field_collisions!r}")


def run_qr(data, model_name: str, embed_dim: int, train_config, config: QRConfig | None = None, *,
           model_cfg: dict | None = None, run_dir=None) -> dict:
    """Quotient-remainder embeddings: one model per collision count (every field hashed alike) and one with the
    per-field ``field_collisions`` when given."""
    config = config or QRConfig()
    runs = [(f"c{int(c)}", int(c)) for c in config.collisions]
    if config.field_collisions:
        runs.append(("per-field", dict(config.field_collisions)))
    rows = []
    for name, c in runs:
        seed_everything(train_config.seed)
        emb = QREmbedding(data.feature_map, embed_dim, collisions=c, operation=config.operation,
                          min_cardinality=config.min_cardinality)
        sub = Path(run_dir) / name if run_dir is not None else None
        _, res = train_and_evaluate(data, model_name, emb, train_config, model_cfg=model_cfg, run_dir=sub)
        rows.append(make_row("qr", f"{config.operation}-{name}", res, collisions=emb.collisions,
                             operation=config.operation))
    return {"rows": rows}


@register_method
class QR(Method):
    """QR embeddings: :func:`run_qr`."""

    name = "qr"
    title = "QR"
    config_class = QRConfig
    help = "QR: quotient-remainder compositional embeddings, one model per collision count"

    def build_embedding(self, feature_map, embed_dim: int) -> QREmbedding:
        c = self.config
        return QREmbedding(feature_map, embed_dim, collisions=int(c.collisions[0]), operation=c.operation,
                           min_cardinality=c.min_cardinality)

    def run(self, data, model_name: str, settings: RunSettings, run_dir=None) -> MethodResult:
        return MethodResult.from_dict(run_qr(data, model_name, settings.embed_dim, settings.train, self.config,
                                             model_cfg=settings.model_cfg, run_dir=run_dir))
