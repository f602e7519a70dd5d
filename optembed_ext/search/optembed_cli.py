"""``optembed search`` (the OptEmbed pipeline) and ``optembed export`` (compact export of a finished run).

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
import typing
from pathlib import Path

import yaml

from .optembed import OptEmbedConfig

#: options of ``search`` that are not OptEmbedConfig fields (YAML key -> default)
DATA_OPTIONS = {"dataset": None, "data_dir": None, "cache_dir": None, "model": "deepfm", "out": None,
                "dataset_kwargs": None, "max_rows": None, "min_count": None, "data_seed": None}


def _yaml_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not a YAML value: {text!r} ({err})") from err


def _bool(text: str) -> bool:
    v = _yaml_value(text)
    if not isinstance(v, bool):
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    return v


def _field_type(f: dataclasses.Field):
    hints = typing.get_type_hints(OptEmbedConfig)
    t = hints[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    base = args[0] if args else t
    if base is bool:
        return _bool
    if base in (int, float):
        def conv(text, _base=base):
            if text.lower() in ("none", "null"):
                return None
            return _base(text)
        return conv
    if base is str:
        return str
    return _yaml_value


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    sup = argparse.SUPPRESS
    p.add_argument("--config", default=None, help="YAML file with the options below (long names as keys)")
    p.add_argument("--dataset", default=sup, help="dataset name (movielens100k, criteo, avazu, synthetic, ...)")
    p.add_argument("--data-dir", default=sup, help="folder of the raw dataset files")
    p.add_argument("--cache-dir", default=sup, help="preprocessing cache folder")
    p.add_argument("--max-rows", type=int, default=sup, help="read at most this many raw rows")
    p.add_argument("--min-count", type=int, default=sup, help="ids seen fewer times map to the OOV id")
    p.add_argument("--data-seed", type=int, default=sup, help="seed of the data split / synthetic data")
    p.add_argument("--dataset-kwargs", type=_yaml_value, default=sup,
                   help="YAML mapping of extra load_dataset arguments, e.g. '{num_fields: 39}'")
    p.add_argument("--model", default=sup, help="backbone: fm, deepfm, dcn, fnn, ipnn, wd, autoint")
    p.add_argument("--out", default=sup, help="run folder (default runs/optembed-<model>-<time>); rerun to resume")
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
    from ..data import load_dataset

    if not opts.get("dataset"):
        raise ValueError("--dataset is required (on the command line or in --config)")
    kwargs = dict(opts.get("dataset_kwargs") or {})
    for key in ("cache_dir", "max_rows", "min_count"):
        if opts.get(key) is not None:
            kwargs[key] = opts[key]
    if opts.get("data_seed") is not None:
        kwargs["seed"] = opts["data_seed"]
    return load_dataset(opts["dataset"], opts.get("data_dir"), progress=False, **kwargs)


def cmd_search(args: argparse.Namespace) -> int:
    from ..train.config import make_run_dir, save_yaml
    from .optembed import run_optembed

    opts, config = resolve_options(args)
    out = make_run_dir(opts["out"], name=f"optembed-{opts['model']}")
    save_yaml(out / "config.yaml", {**{k: v for k, v in opts.items() if v is not None}, "out": str(out),
                                    **config.to_dict()})
    data = load_data(opts)
    result = run_optembed(data, opts["model"], config, out)
    print(Path(result["report"]).read_text())
    print(f"run folder: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_main

    return export_main(args)


def register(subparsers) -> None:
    """Add the ``search`` and ``export`` subcommands."""
    p = subparsers.add_parser("search", help="OptEmbed: supernet, evolutionary search, retraining, report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_arguments(p)
    p.set_defaults(func=cmd_search)
    e = subparsers.add_parser("export", help="export a finished OptEmbed run as a physically compact model")
    from ..export import add_export_arguments

    e.add_argument("--config", default=None, help="unused (accepted for uniformity)")
    add_export_arguments(e)
    e.set_defaults(func=cmd_export)


def main(argv=None) -> int:
    """Entry point of this module alone (``python -m optembed_ext.search.optembed_cli search ...``)."""
    parser = argparse.ArgumentParser(prog="optembed")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
