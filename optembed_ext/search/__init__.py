"""Search schedules: OptEmbed (supernet + evolutionary search + retraining) and the baselines.

The OptEmbed entry points are importable from here; submodules load on first use.
"""
import importlib

_EXPORTS = {
    "run_optembed": "optembed", "OptEmbedConfig": "optembed", "OptEmbedSupernetCallback": "optembed",
    "load_search_result": "optembed", "build_retrained_model": "optembed", "OptEmbedRun": "optembed",
    "EvolutionConfig": "evolution", "EvolutionSearch": "evolution", "evaluate_population": "evolution",
    "evaluate_one_at_a_time": "evolution", "mutate": "evolution", "crossover": "evolution",
    "next_generation": "evolution", "rank": "evolution", "measure_speedup": "evolution",
    "write_report": "report", "render_markdown": "report",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
