"""Methods on the shared trainer: OptEmbed and the baselines, one interface, one registry, the comparison.

- :mod:`.base`: :class:`Method` (name, configuration dataclass, ``build_embedding``, ``run``), the registry
  (:func:`register_method`, :func:`get_method`, :func:`registered_methods`);
- :mod:`.common`: what every schedule shares (:class:`RunSettings`, ``train_and_evaluate``, ``make_row``, ...);
- the methods: :mod:`.uniform`, :mod:`.optembed` (supernet, :mod:`.evolution`, retraining, :mod:`.report`),
  :mod:`.pep`, :mod:`.autodim` and :mod:`.autofield` (both on :mod:`.darts`), :mod:`.qr`;
- :mod:`.compare`: every registered method x backbone x dataset, and :mod:`.table` for its outputs.

Names are importable from here; submodules load on first use.
"""
import importlib

_EXPORTS = {
    "Method": "base", "register_method": "base", "unregister_method": "base", "get_method": "base",
    "registered_methods": "base", "method_names": "base",
    "RunSettings": "common", "train_and_evaluate": "common", "make_row": "common",
    "MethodResult": "optembed_ext.results",
    "run_optembed": "optembed", "OptEmbedConfig": "optembed", "OptEmbedSupernetCallback": "optembed",
    "load_search_result": "optembed", "build_retrained_model": "optembed", "OptEmbedRun": "optembed",
    "OptEmbed": "optembed",
    "EvolutionConfig": "evolution", "EvolutionSearch": "evolution", "evaluate_population": "evolution",
    "evaluate_one_at_a_time": "evolution", "mutate": "evolution", "crossover": "evolution",
    "next_generation": "evolution", "rank": "evolution", "measure_speedup": "evolution",
    "write_report": "report", "render_markdown": "report",
    "CompareConfig": "compare", "run_compare": "compare",
}


def __getattr__(name):
    if name in _EXPORTS:
        target = _EXPORTS[name]
        module = target if "." in target else f"{__name__}.{target}"
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
