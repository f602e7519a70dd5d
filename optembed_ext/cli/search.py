"""``optembed search``: the OptEmbed pipeline (supernet, evolutionary search, retraining, export, report).

Every option of :class:`~optembed_ext.search.optembed.OptEmbedConfig` is a long option (``--threshold-lr``,
``--generations``, ...); ``--config file.yaml`` gives the same keys in a YAML mapping (command-line options win).
Besides those keys the YAML may hold ``dataset``, ``data-dir``, ``model``, ``out``, ``dataset-kwargs`` (a mapping
passed to :func:`optembed_ext.data.load_dataset`, e.g. the ``make_synthetic`` arguments) and ``model-cfg``.

    optembed search --config configs/optembed_ml100k_deepfm.yaml --data-dir ../shared/data/ml-100k --out runs/x \\
        [--ablations] [--epochs 3] [--generations 10] [--optimizer fused_adam] [--device cpu]
    optembed search --config configs/optembed_synthetic.yaml --out runs/synthetic   # planted answer, no files
    optembed search --dataset synthetic --dataset-kwargs '{preset: criteo_interactions, num_samples: 100000}' ...
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from ..search.optembed import OptEmbedConfig
from .common import _field_type as _dataclass_field_type

#: options of ``search`` that are not OptEmbedConfig fields (YAML key -> default)
DATA_OPTIONS = {"dataset": None, "data_dir": None, "cache_dir": None, "model": "deepfm", "out": None,
                "dataset_kwargs": None, "max_rows": None, "min_count": None, "data_seed": None, "spec": None,
                "resume": True}


def _field_type(f: dataclasses.Field):
    return _dataclass_field_type(OptEmbedConfig, f)


def _yaml_mapping(text):
    try:
        value = yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not a YAML value: {text!r} ({err})") from err
    if value is not None and not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping, got {text!r}")
    return value


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    sup = argparse.SUPPRESS
    p.add_argument("--config", default=None, help="YAML file with the options below (long names as keys)")
    p.add_argument("--dataset", default=sup, help="dataset name (movielens100k, criteo, avazu, synthetic, ...)")
    p.add_argument("--data-dir", default=sup, help="folder of the raw dataset files (--dataset csv: the file)")
    p.add_argument("--spec", default=sup, help="--dataset csv: YAML feature spec of the file (see configs/specs/)")
    p.add_argument("--cache-dir", default=sup, help="preprocessing cache folder")
    p.add_argument("--max-rows", type=int, default=sup, help="read at most this many raw rows")
    p.add_argument("--min-count", type=int, default=sup, help="ids seen fewer times map to the OOV id")
    p.add_argument("--data-seed", type=int, default=sup, help="seed of the data split / synthetic data")
    p.add_argument("--dataset-kwargs", type=_yaml_mapping, default=sup,
                   help="YAML mapping of extra load_dataset arguments, e.g. '{num_fields: 39}'")
    p.add_argument("--model", default=sup, help="backbone: fm, deepfm, dcn, fnn, ipnn, wd, autoint")
    p.add_argument("--out", default=sup, help="run folder (default runs/optembed-<model>-<time>); rerun to resume")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=sup,
                   help="continue the run in --out (default; refused when its settings differ); --no-resume "
                        "starts it over")
    p.add_argument("--ablations", action="store_const", const=True, default=sup,
                   help="also run OptEmbed-E (rows only) and OptEmbed-D (dims only)")
    for f in dataclasses.fields(OptEmbedConfig):
        if f.name == "ablations":
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_field_type(f), default=sup,
                       help=f"(default {f.default if f.default is not dataclasses.MISSING else f.default_factory()})")


def resolve_options(args: argparse.Namespace) -> tuple[dict, OptEmbedConfig]:
    """Merge defaults < YAML config < command line; split into data options and the OptEmbedConfig."""
    values: dict = {}
    if args.config:
        from ..train.config import load_yaml_config

        values.update({str(k).replace("-", "_"): v for k, v in load_yaml_config(args.config).items()})
    values.update({k: v for k, v in vars(args).items()
                   if k not in ("config", "func", "command", "log_level") and not k.startswith("_")})
    data = {k: values.pop(k, d) for k, d in DATA_OPTIONS.items()}
    names = {f.name for f in dataclasses.fields(OptEmbedConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} (in --config {args.config})")
    return data, OptEmbedConfig.from_dict(values)


def load_data(opts: dict):
    from .common import load_any

    if not opts.get("dataset"):
        raise ValueError("--dataset is required (on the command line or in --config)")
    kwargs = dict(opts.get("dataset_kwargs") or {})
    for key in ("cache_dir", "max_rows", "min_count"):
        if opts.get(key) is not None:
            kwargs[key] = opts[key]
    if opts.get("data_seed") is not None:
        kwargs["seed"] = opts["data_seed"]
    return load_any(opts["dataset"], opts.get("data_dir"), spec=opts.get("spec"), progress=False, **kwargs)


def cmd_search(args: argparse.Namespace) -> int:
    from ..search.optembed import OptEmbedRun, run_optembed
    from ..train.config import save_yaml
    from .common import open_run_dir

    try:
        opts, config = resolve_options(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    options = {**{k: v for k, v in opts.items() if v is not None}, **config.to_dict()}
    out = open_run_dir(opts["out"], f"optembed-{opts['model']}", "search", options, resume=bool(opts["resume"]),
                       neutral=frozenset(f.replace("_", "-") for f in OptEmbedRun.NEUTRAL_FIELDS))
    save_yaml(out / "config.yaml", {**options, "out": str(out)})
    data = load_data(opts)
    result = run_optembed(data, opts["model"], config, out, log=print, resume=bool(opts["resume"]))
    print(Path(result["report"]).read_text())
    print(f"run folder: {out}")
    return 0


def register(subparsers) -> None:
    """Add the ``search`` subcommand."""
    from ..search.base import get_method

    p = subparsers.add_parser("search", help=get_method("optembed").help,
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(p)
    p.set_defaults(func=cmd_search)
