"""Physically compact export of a searched model: per-field dense tables of the kept rows, one fused lookup.

>>> compact = export_compact("runs/x")            # or export_compact(masked_model, model_cfg=...)
>>> save_compact(compact, "model.pt"); model = load_compact("model.pt")
>>> compare_with_uniform(model)                    # embedding bytes and latency next to the uniform model's
>>> fast = export_inference("runs/x")              # a network that reads only the kept dims (faster inference)
"""
from .compact import (
    DEFAULT_EXPORT_FILE,
    FORMAT,
    FORMAT_VERSION,
    CompactCTRModel,
    compact_from_model,
    compare_with_uniform,
    export_compact,
    export_run,
    format_report,
    load_compact,
    load_run,
    masked_model_from_result,
    measure_latency,
    random_ids,
    save_compact,
    uniform_memory_bytes,
    uniform_model_like,
)
from .inference import InferenceCTRModel, compare_inference, export_inference, inference_from_model

__all__ = [
    "DEFAULT_EXPORT_FILE", "FORMAT", "FORMAT_VERSION", "CompactCTRModel",
    "compact_from_model", "compare_with_uniform", "export_compact", "export_run", "format_report",
    "load_compact", "load_run", "masked_model_from_result", "measure_latency", "random_ids", "save_compact",
    "uniform_memory_bytes", "uniform_model_like",
    "InferenceCTRModel", "compare_inference", "export_inference", "inference_from_model",
]
