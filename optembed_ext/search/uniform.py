"""The uniform table at several dimensions: the reference line of every comparison."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..nn.uniform import UniformEmbedding
from ..results import MethodResult
from .base import Method, register_method
from .common import RunSettings, make_row, seed_everything, train_and_evaluate


@dataclass
class UniformConfig:
    """Dimensions of the uniform tables to train; ``None``: ``D / 4``, ``D / 2`` and ``D`` (the shared
    ``embed_dim``)."""

    dims: list[int] | None = None

    def __post_init__(self):
        if isinstance(self.dims, int) and not isinstance(self.dims, bool):
            self.dims = [self.dims]
        if self.dims is not None:
            if not self.dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.dims):
                raise ValueError(f"dims must be positive ints, got {self.dims!r}")
            self.dims = [int(d) for d in self.dims]

    def dims_for(self, embed_dim: int) -> list[int]:
        if self.dims:
            return list(self.dims)
        d = int(embed_dim)
        return sorted({max(1, d // 4), max(1, d // 2), d})


def run_uniform(data, model_name: str, train_config, dims, *, model_cfg: dict | None = None,
                run_dir=None) -> dict:
    """The plain table at every dimension in ``dims`` (the reference line)."""
    rows = []
    for d in dims:
        seed_everything(train_config.seed)
        emb = UniformEmbedding(data.feature_map, int(d))
        sub = Path(run_dir) / f"dim{int(d)}" if run_dir is not None else None
        _, res = train_and_evaluate(data, model_name, emb, train_config, model_cfg=model_cfg, run_dir=sub)
        rows.append(make_row("uniform", f"D{int(d)}", res, embed_dim=int(d)))
    return {"rows": rows}


@register_method
class Uniform(Method):
    """Uniform ``(N, d)`` tables, one trained model per dimension."""

    name = "uniform"
    config_class = UniformConfig
    help = "uniform tables at several dimensions (the reference line)"

    def build_embedding(self, feature_map, embed_dim: int) -> UniformEmbedding:
        return UniformEmbedding(feature_map, int(embed_dim))

    def run(self, data, model_name: str, settings: RunSettings, run_dir=None) -> MethodResult:
        return MethodResult.from_dict(run_uniform(data, model_name, settings.train,
                                                  self.config.dims_for(settings.embed_dim),
                                                  model_cfg=settings.model_cfg, run_dir=run_dir))
