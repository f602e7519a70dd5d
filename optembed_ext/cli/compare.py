"""``optembed compare``: every registered method x backbone x dataset -> table, CSV/JSON and Pareto plot.

Takes every field of :class:`~optembed_ext.search.compare.CompareConfig` as a long option (``--methods
uniform,pep``, ``--datasets movielens100k``, ``--pep '{threshold_init: -15}'``) and writes ``table.md``,
``results.csv``, ``results.json`` and ``pareto.png`` next to the per-method run folders.

    optembed compare --config configs/compare_ml100k.yaml --out runs/compare-ml100k
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ..train.config import append_log, make_run_dir, save_json, save_yaml
from .common import add_dataclass_arguments, fail


def cmd_compare(args: argparse.Namespace) -> int:
    from ..search.compare import CompareConfig, format_table, run_compare

    names = {f.name for f in dataclasses.fields(CompareConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    for m, dest in (getattr(args, "_method_dests", None) or {}).items():
        if hasattr(args, dest):
            values[m] = getattr(args, dest)
    try:
        config = CompareConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise fail(err) from None
    from ..train import distributed

    out = Path(distributed.broadcast_object(str(make_run_dir(config.out, name="compare"))
                                            if distributed.is_main() else None))
    config.out = str(out)
    save_yaml(out / "config.yaml", {"command": "compare",
                                    **{k.replace("_", "-"): v for k, v in config.to_dict().items()}})
    append_log(out, f"compare: datasets {config.datasets} models {config.models} methods {config.methods}")
    t0 = time.perf_counter()
    rows = run_compare(config, out=out)
    save_json(out / "metrics.json", {"command": "compare", "rows": rows, "wall_seconds": time.perf_counter() - t0,
                                     "table": str(out / "table.md"), "plot": str(out / "pareto.png")})
    append_log(out, f"compare finished: {len(rows)} rows in {time.perf_counter() - t0:.1f}s")
    print(format_table(rows))
    print(f"run folder: {out}")
    return 0


def register(subparsers) -> None:
    """Add ``compare``: the CompareConfig fields, plus a mapping option for every registered method without a
    field of its own (``--<method> '{option: value}'``)."""
    from ..search.base import registered_methods
    from ..search.compare import CompareConfig
    from .common import _yaml_value

    c = subparsers.add_parser("compare", help="run methods x backbones x datasets; write the table and the "
                                              "AUC-vs-parameters Pareto plot",
                              description="Comparison harness: every method on every backbone and dataset with "
                                          "the same seeds and splits; writes table.md, results.csv/json and "
                                          "pareto.png. Per-method settings are mappings (--pep '{...}').")
    add_dataclass_arguments(c, CompareConfig, "compare options")
    fields = {f.name for f in dataclasses.fields(CompareConfig)}
    dests = {}
    g = c.add_argument_group("options of other registered methods")
    for name in registered_methods():
        if name in fields:
            continue
        dest = f"_method_{name}"
        g.add_argument(f"--{name.replace('_', '-')}", dest=dest, type=_yaml_value, default=argparse.SUPPRESS,
                       help=f"mapping of {name} options")
        dests[name] = dest
    c.set_defaults(func=cmd_compare, _method_dests=dests)
