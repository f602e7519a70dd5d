"""Export a searched (row- and dim-masked) CTR model as a physically compact model.

The masked model keeps a full ``(N, D)`` table and masks it at lookup time. The exported model stores only the
kept rows, each field at its own dimension (:class:`~optembed_ext.nn.compact.CompactEmbedding`), serves them with
one fused lookup that returns the same zero-padded ``(B, F, D)`` tensor, and reuses the backbone unchanged, so its
predictions equal the masked model's. It is saved as one ``torch.save`` file holding a plain state dict and a
JSON-able config; :func:`load_compact` rebuilds it without the original table.
"""
from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..nn.compact import CompactEmbedding
from ..results import RESULT_FILE, build_retrained_model, load_search_result, result_path  # noqa: F401
from ..results import feature_map_from_dict as _feature_map_from_dict
from ..results import feature_map_to_dict as _feature_map_to_dict

_log = logging.getLogger(__name__)

FORMAT = "optembed-compact"
FORMAT_VERSION = 1
DEFAULT_EXPORT_FILE = "compact_model.pt"


class CompactCTRModel(nn.Module):
    """A CTR backbone served from compact per-field tables.

    ``forward(ids (B, F)) -> logits (B,)``; ``self.model`` is the backbone built by
    :func:`optembed_ext.models.build_model` around :attr:`embedding` (a :class:`CompactEmbedding`).

    Args:
        model_name: backbone name (a key of :data:`optembed_ext.models.MODELS`).
        feature_map: the dataset's feature map.
        embedding: the compact table.
        model_cfg: keyword options of ``build_model`` (``mlp_dims``, ``cross_layers``, ...).
    """

    def __init__(self, model_name: str, feature_map, embedding: CompactEmbedding, model_cfg: dict | None = None):
        super().__init__()
        from ..models import build_model

        if not isinstance(embedding, CompactEmbedding):
            raise TypeError(f"embedding must be a CompactEmbedding, got {type(embedding).__name__}")
        self.model_name = str(model_name)
        self.model_cfg = dict(model_cfg or {})
        self.feature_map = feature_map
        self.model = build_model(self.model_name, feature_map, embedding, **self.model_cfg)

    @property
    def embedding(self) -> CompactEmbedding:
        return self.model.embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def predict_from_embeddings(self, emb: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        return self.model.predict_from_embeddings(emb, ids)

    def config(self) -> dict:
        """JSON-able description that, with a state dict, rebuilds this model (:meth:`from_config`)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_name": self.model_name,
            "model_cfg": _jsonable(self.model_cfg),
            "feature_map": _jsonable(_feature_map_to_dict(self.feature_map)),
            "embedding": self.embedding.config(),
        }

    @classmethod
    def from_config(cls, config: dict) -> "CompactCTRModel":
        """An uninitialised model of the shape ``config`` describes (load a state dict into it)."""
        if config.get("format") != FORMAT:
            raise ValueError(f"config is not an {FORMAT} config (format={config.get('format')!r})")
        if int(config.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(f"config version {config.get('version')} is newer than this library "
                             f"({FORMAT_VERSION}); upgrade optembed_ext")
        fmap = _feature_map_from_dict(config["feature_map"])
        emb = CompactEmbedding.from_config(fmap, config["embedding"])
        return cls(config["model_name"], fmap, emb, config.get("model_cfg") or {})

    def save(self, path) -> Path:
        return save_compact(self, path)


def _jsonable(obj):
    """Round-trip through JSON so the saved config holds only plain types (loadable with weights_only=True)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ----------------------------------------------------------------------------------------------------- export
def _table_of(embedding) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[int] | None]:
    """(weight (N, D), oov (F, D) or None, row_mask (N,) or None, field_dims or None) of a masked embedding."""
    from ..nn.optembed import OptEmbedEmbedding
    from ..nn.uniform import UniformEmbedding

    # Other tables (PEP's soft threshold, QR, AutoDim mixtures, ...) do not serve rows of one (N, D) table
    # as they are stored, so exporting their `weight` would silently change the predictions.
    if not isinstance(embedding, (OptEmbedEmbedding, UniformEmbedding)):
        raise TypeError(f"cannot export {type(embedding).__name__}: compact export supports UniformEmbedding and "
                        "OptEmbedEmbedding (row- and dim-masked) tables")
    weight = embedding.weight
    oov = getattr(embedding, "oov_weight", None)
    row_mask = embedding.row_mask() if callable(getattr(embedding, "row_mask", None)) else None
    field_dims = None
    if callable(getattr(embedding, "field_dims", None)):
        field_dims = [int(d) for d in embedding.field_dims()]
    dims_now = getattr(embedding, "dims", None)
    if isinstance(dims_now, torch.Tensor) and dims_now.dim() == 1:
        field_dims = [int(d) for d in dims_now.tolist()]  # per-field dims set for evaluation take precedence
    return weight.detach(), None if oov is None else oov.detach(), row_mask, field_dims


@torch.no_grad()
def compact_from_model(model: nn.Module, *, model_name: str | None = None, model_cfg: dict | None = None,
                       row_mask: torch.Tensor | None = None, field_dims: Sequence[int] | None = None,
                       remap_dtype: torch.dtype = torch.int32, check_indices: bool = True) -> CompactCTRModel:
    """Compact copy of a CTR model whose embedding is a (masked) ``(N, D)`` table.

    ``row_mask`` / ``field_dims`` override the embedding's own (``row_mask()`` / ``field_dims()`` of an
    :class:`~optembed_ext.nn.optembed.OptEmbedEmbedding`; all rows and ``D`` for a uniform table).
    ``model_cfg`` (the ``build_model`` options of the backbone) is stored so :func:`load_compact` can rebuild it;
    when omitted the backbone is rebuilt with its defaults, which must match its parameter shapes.
    """
    emb = getattr(model, "embedding", None)
    if emb is None:
        raise TypeError(f"model must be a CTR model with an `embedding` attribute, got {type(model).__name__}")
    weight, oov, own_mask, own_dims = _table_of(emb)
    fmap = model.feature_map
    mask = own_mask if row_mask is None else torch.as_tensor(row_mask, device=weight.device)
    dims = own_dims if field_dims is None else [int(d) for d in field_dims]
    compact_emb = CompactEmbedding.from_table(fmap, weight, mask, dims, oov, remap_dtype=remap_dtype,
                                              check_indices=check_indices)
    name = model_name or getattr(model, "name", "")
    if not name:
        raise ValueError("model_name is required (the model class defines no registry `name`)")
    out = CompactCTRModel(name, fmap, compact_emb, model_cfg)
    # Copy the backbone (everything but the embedding) parameter for parameter.
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding.")}
    target = out.model.state_dict()
    extra = sorted(set(backbone) - {k for k in target if not k.startswith("embedding.")})
    missing = sorted({k for k in target if not k.startswith("embedding.")} - set(backbone))
    if extra or missing:
        raise ValueError(f"backbone of the rebuilt {name!r} model does not match the source (pass the source's "
                         f"model_cfg): unexpected {extra[:5]}, missing {missing[:5]}")
    for k, v in backbone.items():
        if target[k].shape != v.shape:
            raise ValueError(f"backbone parameter {k} has shape {tuple(v.shape)} in the source but "
                             f"{tuple(target[k].shape)} in the rebuilt model (pass the source's model_cfg)")
    out.model.load_state_dict({**target, **backbone})
    out.to(weight.device)
    out.train(model.training)
    return out


def export_compact(source, *, model_name: str | None = None, model_cfg: dict | None = None,
                   row_mask: torch.Tensor | None = None, field_dims: Sequence[int] | None = None,
                   remap_dtype: torch.dtype = torch.int32, check_indices: bool = True) -> CompactCTRModel:
    """Compact model of ``source``: a finished OptEmbed run folder (or its ``optembed_result.pt``), the dict of
    :func:`optembed_ext.results.load_search_result`, or a live CTR model (see :func:`compact_from_model`).

    The result predicts exactly what the masked model predicts (up to float summation order in the backbone).
    """
    if isinstance(source, nn.Module):
        return compact_from_model(source, model_name=model_name, model_cfg=model_cfg, row_mask=row_mask,
                                  field_dims=field_dims, remap_dtype=remap_dtype, check_indices=check_indices)
    result = source if isinstance(source, dict) else load_run(source)
    model = masked_model_from_result(result)
    return compact_from_model(model, model_name=result["model_name"], model_cfg=dict(result.get("model_cfg") or {}),
                              row_mask=row_mask, field_dims=field_dims, remap_dtype=remap_dtype,
                              check_indices=check_indices)


def load_run(path) -> dict:
    """``optembed_result.pt`` of a run folder (or the file itself) as a dict (see
    :func:`optembed_ext.results.load_search_result`)."""
    return load_search_result(result_path(path).parent)


def masked_model_from_result(result: dict) -> nn.Module:
    """The retrained masked model (frozen row mask and field dims) of a search result, in eval mode."""
    return build_retrained_model(result).eval()


# ------------------------------------------------------------------------------------------------ save / load
def save_compact(model: CompactCTRModel, path) -> Path:
    """Write ``{"format", "version", "config", "state_dict"}`` with ``torch.save`` (plain tensors and types)."""
    if not isinstance(model, CompactCTRModel):
        raise TypeError(f"model must be a CompactCTRModel, got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config(), "state_dict": state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_compact(path, map_location="cpu") -> CompactCTRModel:
    """Rebuild a model written by :func:`save_compact` (``weights_only`` load; needs no original table)."""
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} file")
    model = CompactCTRModel.from_config(payload["config"])
    model.load_state_dict(payload["state_dict"])
    if map_location is not None:
        model.to(map_location)
    return model.eval()


# ------------------------------------------------------------------------------------- memory and latency
def uniform_memory_bytes(feature_map, embed_dim: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the uniform ``(N, D)`` table."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(feature_map.num_features) * int(embed_dim) * itemsize


def uniform_model_like(model: CompactCTRModel) -> nn.Module:
    """The same backbone around a uniform ``(N, D)`` table (random values; for size and latency comparison)."""
    from ..nn.uniform import UniformEmbedding

    src = model.model
    uniform = copy.deepcopy(src)
    emb = UniformEmbedding(model.feature_map, model.embedding.embed_dim)
    uniform.embedding = emb.to(device=model.embedding.packed.device, dtype=model.embedding.packed.dtype)
    return uniform.train(src.training)


def random_ids(feature_map, batch_size: int, *, generator: torch.Generator | None = None,
               device=None) -> torch.Tensor:
    """(batch_size, F) int64 global ids drawn uniformly within each field's block."""
    cards = torch.tensor(feature_map.cardinalities, dtype=torch.long)
    offs = torch.tensor(feature_map.offsets, dtype=torch.long)
    u = torch.rand(batch_size, len(cards), generator=generator, dtype=torch.float64)
    ids = (u * cards).long().clamp_max(cards - 1) + offs
    return ids.to(device) if device is not None else ids


@torch.no_grad()
def measure_latency(model: nn.Module, ids: torch.Tensor, *, repeats: int = 20, warmup: int = 3) -> dict:
    """Inference latency of ``model(ids)`` in eval mode: median / min / mean milliseconds per batch."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    try:
        for _ in range(max(0, warmup)):
            model(ids)
        sync()
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            model(ids)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    return {"batch_size": int(ids.shape[0]), "median_ms": statistics.median(times), "min_ms": min(times),
            "mean_ms": statistics.fmean(times), "repeats": len(times)}


def compare_with_uniform(model: CompactCTRModel, ids: torch.Tensor | None = None, *,
                         masked_model: nn.Module | None = None, batch_size: int = 4096, repeats: int = 20,
                         warmup: int = 3, seed: int = 0) -> dict:
    """Embedding bytes and inference latency of the compact model next to the uniform model's (and, when given,
    the masked model's, whose predictions are also compared with the compact model's)."""
    dev = model.embedding.packed.device
    if ids is None:
        ids = random_ids(model.feature_map, batch_size, generator=torch.Generator().manual_seed(seed), device=dev)
    emb = model.embedding
    uniform = uniform_model_like(model)
    uniform_bytes = uniform_memory_bytes(model.feature_map, emb.embed_dim, emb.packed.dtype)
    compact_bytes = emb.memory_bytes()
    out: dict[str, Any] = {
        "num_features": int(model.feature_map.num_features),
        "num_fields": int(emb.num_fields),
        "embed_dim": int(emb.embed_dim),
        "field_dims": [int(d) for d in emb.field_dims.tolist()],
        "kept_rows_per_field": list(emb.field_rows),
        "kept_rows": int(sum(emb.field_rows)),
        "memory": {
            "uniform_bytes": uniform_bytes,
            "compact_bytes": compact_bytes,
            "compact_breakdown": emb.memory_breakdown(),
            "compression_ratio": uniform_bytes / max(compact_bytes, 1),
        },
    }
    lat = {"uniform": measure_latency(uniform, ids, repeats=repeats, warmup=warmup),
           "compact": measure_latency(model, ids, repeats=repeats, warmup=warmup)}
    if masked_model is not None:
        lat["masked"] = measure_latency(masked_model, ids, repeats=repeats, warmup=warmup)
        was = (model.training, masked_model.training)
        model.eval()
        masked_model.eval()
        with torch.no_grad():
            diff = (model(ids).double() - masked_model(ids).double()).abs().max()
        model.train(was[0])
        masked_model.train(was[1])
        out["max_abs_logit_diff_vs_masked"] = float(diff)
    lat["compact_over_uniform"] = lat["compact"]["median_ms"] / max(lat["uniform"]["median_ms"], 1e-12)
    out["latency"] = lat
    return out


# ------------------------------------------------------------------------------------------------ run folders
def export_run(run, out=None, *, batch_size: int = 4096, repeats: int = 20, benchmark: bool = True,
               device: str = "cpu", log=None) -> Path:
    """Export the run folder ``run`` to ``out`` (a file, or a folder receiving ``compact_model.pt``; default
    ``run/compact_model.pt``) and write ``<out>.json`` with the memory and latency comparison. Returns ``out``.
    ``log`` receives the summary (:func:`format_report`; default: this module's ``logging`` logger)."""
    run = Path(run)
    result = load_run(run)
    run_dir = run.parent if run.is_file() else run
    if out is None:
        out_path = run_dir / DEFAULT_EXPORT_FILE
    else:
        out_path = Path(out)
        if out_path.is_dir() or (not out_path.suffix and not out_path.exists()):
            out_path = out_path / DEFAULT_EXPORT_FILE
    masked = masked_model_from_result(result).to(device)
    compact = compact_from_model(masked, model_name=result["model_name"],
                                 model_cfg=dict(result.get("model_cfg") or {})).eval()
    save_compact(compact, out_path)
    reloaded = load_compact(out_path, map_location=device)
    report: dict[str, Any] = {"run": str(run_dir), "model": str(out_path), "model_name": result["model_name"],
                              "file_bytes": out_path.stat().st_size}
    if benchmark:
        report.update(compare_with_uniform(reloaded, masked_model=masked, batch_size=batch_size, repeats=repeats))
    else:
        report.update({"memory": {"compact_bytes": reloaded.embedding.memory_bytes(),
                                  "uniform_bytes": uniform_memory_bytes(reloaded.feature_map,
                                                                        reloaded.embedding.embed_dim)}})
    report_path = out_path.with_name(out_path.name + ".json")
    report_path.write_text(json.dumps(report, indent=1))
    (log or _log.info)(format_report(report))
    return out_path


def format_report(report: dict) -> str:
    """Human-readable summary of :func:`compare_with_uniform` / :func:`export_run`."""
    mem = report.get("memory", {})
    lines = [f"compact model: {report['model']}"] if report.get("model") else []
    if mem:
        lines.append(f"embedding memory: uniform {mem['uniform_bytes']:,} B  compact {mem['compact_bytes']:,} B  "
                     f"({mem['uniform_bytes'] / max(mem['compact_bytes'], 1):.2f}x smaller)")
    lat = report.get("latency")
    if lat:
        parts = [f"{k} {v['median_ms']:.3f} ms" for k, v in lat.items() if isinstance(v, dict)]
        lines.append(f"inference latency per batch of {lat['compact']['batch_size']} (median): " + ", ".join(parts))
    if "max_abs_logit_diff_vs_masked" in report:
        lines.append(f"max |logit(compact) - logit(masked)| = {report['max_abs_logit_diff_vs_masked']:.3g}")
    return "\n".join(lines)
