"""``optembed pep | autodim | qr | autofield | compare``: the baseline methods and the comparison harness.

Each method subcommand takes the data, model and training options of ``optembed train`` plus the fields of
the method's configuration dataclass as long options (``--threshold-type``, ``--candidates 2,8,16``, ...);
``--config file.yaml`` holds the same keys (``threshold-type: feature_dim``), the command line wins. A run
writes a folder (``--out``, default ``runs/<command>-<dataset>-<model>-<time>``) with ``config.yaml`` (the
merged options, reusable as ``--config``), ``metrics.json`` (result rows and the search outcome) and
``log.txt``, plus the trainer run folders of the search and retraining stages.

``--dataset`` accepts the :func:`optembed_ext.data.load_dataset` names and the synthetic presets of the
harness (``synthetic-criteo``, ``synthetic-tiny``; see :data:`optembed_ext.search.compare.SYNTHETIC_PRESETS`).

``optembed compare`` takes every field of :class:`~optembed_ext.search.compare.CompareConfig` as a long option
(``--methods uniform,pep``, ``--datasets movielens100k``, ``--pep '{threshold_init: -15}'``) and writes
``table.md``, ``results.csv``, ``results.json`` and ``pareto.png`` next to the per-method run folders.

    optembed pep --dataset movielens100k --data-dir ../shared/data/ml-100k --model deepfm --epochs 5 \\
        --target-sparsities 0.5,0.8,0.9 --out runs/pep-ml100k
    optembed compare --config configs/compare_tiny.yaml --out runs/compare-tiny
"""
from __future__ import annotations

import argparse
import dataclasses
import time
import typing

import yaml

from ..train.cli import (add_data_arguments, add_model_arguments, add_train_arguments, model_kwargs_from_args,
                         require, start_run, train_config_from_args)
from ..train.config import append_log, make_run_dir, save_json, save_yaml

#: the method subcommands: name -> (module, config class, run function, one-line help)
METHOD_COMMANDS = {
    "pep": ("optembed_ext.search.pep", "PEPConfig", "run_pep",
            "PEP: soft-threshold pruning at several budgets, then (lottery-ticket) retraining"),
    "autodim": ("optembed_ext.search.autodim", "AutoDimConfig", "run_autodim",
                "AutoDim: Gumbel-softmax dimension search with DARTS steps on validation data, then retraining"),
    "qr": ("optembed_ext.search.compare", "QRConfig", "run_qr",
           "QR: quotient-remainder compositional embeddings, one model per collision count"),
    "autofield": ("optembed_ext.search.autofield", "AutoFieldConfig", "run_autofield",
                  "AutoField: field gates searched on validation data, keep the top fields, retrain"),
}

#: official PEP training defaults (ssui-liu/learnable-embed-sizes-for-RecSys)
PEP_TRAIN_DEFAULTS = {"weight_decay": 1e-5, "batch_size": 1024}


# ------------------------------------------------------------------------------------------ value parsing
def _yaml_value(text):
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not a YAML value: {text!r} ({err})") from err


def _bool(text) -> bool:
    v = _yaml_value(text)
    if not isinstance(v, bool):
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    return v


def _list_of(cast):
    def conv(text):
        if isinstance(text, (list, tuple)):
            return [cast(v) for v in text]
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return [cast(text)]
        parts = [p for p in str(text).replace(" ", "").strip("[]").split(",") if p]
        try:
            return [cast(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    conv.__name__ = f"list_of_{cast.__name__}"
    return conv


def _optional(cast):
    def conv(text):
        if text is None or (isinstance(text, str) and text.lower() in ("none", "null")):
            return None
        return cast(text)
    conv.__name__ = f"optional_{cast.__name__}"
    return conv


def _field_type(cls, f: dataclasses.Field):
    """An argparse ``type`` for a dataclass field (bool, int, float, str, list of numbers, mapping)."""
    import types

    hint = typing.get_type_hints(cls)[f.name]
    optional, base = False, hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None))
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        inner = typing.get_args(base)
        conv = _list_of(inner[0] if inner and inner[0] in (int, float, str) else _yaml_value)
    elif base is bool:
        conv = _bool
    elif base in (int, float, str):
        conv = base
    else:
        conv = _yaml_value
    return _optional(conv) if optional else conv


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, title: str, skip=(), prefix: str | None = None
                            ) -> dict[str, str]:
    """One long option per field of ``cls`` (default ``argparse.SUPPRESS``, so the dataclass default applies
    unless the option is given). A field whose option the parser already has (e.g. AutoDim's ``batch_norm``
    next to the model's ``--batch-norm``) becomes ``--<prefix>-<field>``. Returns ``{field: dest}``."""
    g = parser.add_argument_group(title)
    taken = {opt for a in parser._actions for opt in a.option_strings}
    added = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = f.name.replace("_", "-")
        dest = f.name
        if "--" + name in taken:
            if prefix is None:
                raise ValueError(f"option --{name} of {cls.__name__} clashes with an existing option")
            name, dest = f"{prefix}-{name}", f"{prefix}_{f.name}"
        g.add_argument("--" + name, dest=dest, type=_field_type(cls, f), default=argparse.SUPPRESS,
                       help=f"(default {_default_text(f)})")
        added[f.name] = dest
    return added


# ------------------------------------------------------------------------------------------------- data
def load_data(args: argparse.Namespace):
    """The dataset of ``--dataset``: a harness synthetic preset, or :func:`optembed_ext.data.load_dataset`."""
    from ..train.cli import load_data_from_args
    from .compare import SYNTHETIC_PRESETS

    require(args, "dataset")
    if args.dataset in SYNTHETIC_PRESETS and args.dataset != "synthetic":
        from ..data import make_synthetic

        kwargs = dict(SYNTHETIC_PRESETS[args.dataset])
        if args.num_samples is not None:
            kwargs["num_samples"] = int(args.num_samples)
        data = make_synthetic(seed=args.data_seed, split=args.split, **kwargs)
        data.feature_map.dataset = args.dataset
        return data
    return load_data_from_args(args, progress=False)


# ------------------------------------------------------------------------------------------------ commands
def _method_config(args: argparse.Namespace, cls, dests: dict[str, str], fixed: dict | None = None):
    values = {name: getattr(args, dest) for name, dest in dests.items() if hasattr(args, dest)}
    values.update(fixed or {})
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def _cmd_method(command: str):
    import importlib

    module_name, cls_name, fn_name, _ = METHOD_COMMANDS[command]

    def run(args: argparse.Namespace) -> int:
        module = importlib.import_module(module_name)
        cls, fn = getattr(module, cls_name), getattr(module, fn_name)
        from ..models import MODELS

        if args.model not in MODELS:
            raise SystemExit(f"error: --model must be one of {', '.join(MODELS)}, got {args.model!r}")
        # PEP's batch size and weight decay are the training options (whose defaults are PEP's official ones)
        fixed = {"weight_decay": None, "batch_size": None} if command == "pep" else None
        config = _method_config(args, cls, args._method_fields, fixed)
        train_config = train_config_from_args(args)
        run_dir = start_run(args, command)
        t0 = time.perf_counter()
        data = load_data(args)
        fm = data.feature_map
        append_log(run_dir, f"data: {fm.dataset} {fm.num_fields} fields {fm.num_features} features, "
                            f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}")
        append_log(run_dir, f"{command} config: {dataclasses.asdict(config)}")
        res = fn(data, args.model, args.embed_dim, train_config, config, model_cfg=model_kwargs_from_args(args),
                 run_dir=run_dir)
        rows = [{"dataset": fm.dataset, "model": args.model, "seed": train_config.seed, **r} for r in res["rows"]]
        save_json(run_dir / "metrics.json", {"command": command, "dataset": fm.dataset, "model": args.model,
                                              "method": command, "rows": rows, "search": res.get("search"),
                                              "wall_seconds": time.perf_counter() - t0})
        for r in rows:
            msg = (f"{fm.dataset} {args.model} {command} {r['variant']}: test AUC {r['auc']:.4f} "
                   f"logloss {r['logloss']:.4f} embedding params {r['num_params']} sparsity {r['sparsity']:.4f}")
            append_log(run_dir, msg)
            print(msg)
        if not rows:
            msg = f"{command}: no retrained model (see metrics.json 'search')"
            append_log(run_dir, msg)
            print(msg)
        print(f"run folder: {run_dir}")
        return 0

    return run


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, format_table, run_compare

    names = {f.name for f in dataclasses.fields(CompareConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    try:
        config = CompareConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    out = make_run_dir(config.out, name="compare")
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


# ------------------------------------------------------------------------------------------------ register
def _add_method_parser(subparsers, command: str) -> None:
    import importlib

    module_name, cls_name, _, help_text = METHOD_COMMANDS[command]
    cls = getattr(importlib.import_module(module_name), cls_name)
    p = subparsers.add_parser(command, help=help_text, description=help_text)
    add_data_arguments(p)
    add_model_arguments(p)
    add_train_arguments(p)
    # fields that duplicate a training option are taken from the training options
    skip = {"weight_decay", "batch_size"} if command == "pep" else set()
    fields = add_dataclass_arguments(p, cls, f"{command} options", skip=skip, prefix=command)
    if command == "pep":
        p.set_defaults(**PEP_TRAIN_DEFAULTS)
    p.set_defaults(func=_cmd_method(command), _method_fields=fields)


def register(subparsers) -> None:
    """Add the ``pep``, ``autodim``, ``qr``, ``autofield`` and ``compare`` subcommands."""
    for command in METHOD_COMMANDS:
        _add_method_parser(subparsers, command)

    from .compare import CompareConfig

    c = subparsers.add_parser("compare", help="run methods x backbones x datasets; write the table and the "
                                              "AUC-vs-parameters Pareto plot",
                              description="Comparison harness: every method on every backbone and dataset with "
                                          "the same seeds and splits; writes table.md, results.csv/json and "
                                          "pareto.png. Per-method settings are mappings (--pep '{...}').")
    add_dataclass_arguments(c, CompareConfig, "compare options")
    c.set_defaults(func=cmd_compare)


def main(argv=None) -> int:
    """Entry point of this module alone (``python -m optembed_ext.search.baselines_cli pep ...``)."""
    from ..cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
