"""Argument helpers every subcommand shares: data, model and training options, run folders, dataclass options.

Every option has a long name; a YAML file passed with ``--config`` uses those names as keys (``embed-dim: 16``)
and the command line wins over it. A run writes a folder (``--out``, default ``runs/<command>-<dataset>-<time>``)
with ``config.yaml`` (the merged options, reusable as ``--config``), ``metrics.json`` and ``log.txt``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

import yaml

from ..train.checkpoint import check_fingerprint
from ..train.config import MONITORS, TrainConfig, append_log, clear_run_dir, make_run_dir, save_yaml

_TRAIN_DEFAULTS = TrainConfig()


# ----------------------------------------------------------------------------------------- parsing helpers
def int_list(value) -> tuple[int, ...]:
    """``"1024,512,256"`` / ``[1024, 512, 256]`` / ``256`` -> ``(1024, 512, 256)``; ``""`` -> ``()``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}")


def _arg_int_list(value: str) -> tuple[int, ...]:
    return int_list(value)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dataset --data-dir --spec --cache-dir --min-count --preset --split --data-seed --max-rows --strict
    --num-samples``."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", help="criteo, avazu, kdd12, movielens1m, movielens100k, synthetic, or csv (your own "
                                     "CSV/TSV/Parquet file with --spec) (required)")
    g.add_argument("--data-dir", help="folder (or file) of the raw dataset; for --dataset csv the file itself")
    g.add_argument("--spec", help="--dataset csv: YAML feature spec of the file (label rule, fields, split); see "
                                  "configs/specs/")
    g.add_argument("--cache-dir", help="folder of the preprocessing cache (encoded arrays + feature map)")
    g.add_argument("--min-count", type=int, default=None,
                   help="values seen fewer times become the field's OOV id (default: the preset's)")
    g.add_argument("--preset", default=None,
                   help="preprocessing rules: default, or paper (criteo/avazu/kdd12: the OptEmbed paper's "
                        "min count 2 and field lists, e.g. 24 Avazu fields)")
    g.add_argument("--split", default=None,
                   help="random or sequential train/val/test split (default random; --dataset csv: the spec's)")
    g.add_argument("--data-seed", type=int, default=None,
                   help="seed of the random split / synthetic data (default 2022; --dataset csv: the spec's)")
    g.add_argument("--max-rows", type=int, default=None, help="read at most this many raw rows")
    g.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                   help="stop at the first malformed raw row instead of skipping and counting it")
    g.add_argument("--num-samples", type=int, default=None, help="synthetic dataset only: number of samples")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Backbone options: ``--model --embed-dim --mlp-dims --dropout --batch-norm --cross-layers ...``."""
    from ..models import MODELS

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="deepfm", help=f"one of {', '.join(MODELS)} (default deepfm)")
    g.add_argument("--embed-dim", type=int, default=64, help="embedding dimension D (default 64)")
    g.add_argument("--mlp-dims", type=_arg_int_list, default=(1024, 512, 256),
                   help="hidden sizes of the MLP, comma separated (default 1024,512,256)")
    g.add_argument("--dropout", type=float, default=0.0, help="MLP dropout (default 0)")
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="batch norm in the MLP (default on)")
    g.add_argument("--cross-layers", type=int, default=6, help="DCN cross layers (default 6)")
    g.add_argument("--attention-layers", type=int, default=3, help="AutoInt attention layers (default 3)")
    g.add_argument("--num-heads", type=int, default=2, help="AutoInt heads (default 2)")
    g.add_argument("--attention-dim", type=int, default=None, help="AutoInt per-head size (default D / heads)")
    g.add_argument("--use-mlp", action=argparse.BooleanOptionalAction, default=False,
                   help="AutoInt+: add an MLP to AutoInt (default off)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The :class:`TrainConfig` fields as options, plus ``--out`` and ``--resume``."""
    d = _TRAIN_DEFAULTS
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--optimizer", default=d.optimizer,
                   help="adam, sparse_adam, adagrad, sgd, or a fused sparse optimizer for the embedding table: "
                        "fused_sgd, fused_adagrad, fused_adam, or the same applied inside the lookup's backward: "
                        "fused_bwd_sgd, fused_bwd_adagrad, fused_bwd_adam; any fused name + _lazywd (e.g. "
                        "fused_adam_lazywd) also applies --weight-decay to the rows a step does not touch")
    g.add_argument("--embedding-lr", type=float, default=d.embedding_lr,
                   help="learning rate of the embedding table (default: --lr)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--threshold-optimizer", default=d.threshold_optimizer, choices=("sgd", "adam"),
                   help="optimizer of learned pruning thresholds (default sgd, as the OptEmbed authors)")
    g.add_argument("--threshold-lr", type=float, default=d.threshold_lr,
                   help="learning rate of learned pruning thresholds (default: the module's)")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="epochs without a better monitored validation score before stopping")
    g.add_argument("--monitor", default=d.monitor, choices=MONITORS,
                   help="validation metric that picks the best epoch and drives early stopping: auc (default), "
                        "logloss, or auc-logloss")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=d.deterministic,
                   help="torch.use_deterministic_algorithms during training")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                   help="tqdm progress bars")
    g.add_argument("--max-steps-per-epoch", type=int, default=d.max_steps_per_epoch)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this value")
    g.add_argument("--sync-batch-norm", action=argparse.BooleanOptionalAction, default=d.sync_batch_norm,
                   help="torchrun: batch norm over the whole global batch, not each rank's share (default on)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="also checkpoint every that many steps (default: once per epoch)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from <out>/checkpoint.pt when it exists (default on)")
    add_out_argument(parser)


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="run folder (default runs/<command>-<dataset>-<time>)")


def args_to_config(args: argparse.Namespace) -> dict:
    """The parsed options keyed by their long option names (reusable as a ``--config`` file)."""
    skip = {"func", "config", "command", "log_level"}
    out = {}
    for k, v in vars(args).items():
        if k in skip or k.startswith("_"):
            continue
        out[k.replace("_", "-")] = list(v) if isinstance(v, tuple) else v
    return out


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from the options added by :func:`add_train_arguments`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values)


def model_kwargs_from_args(args: argparse.Namespace) -> dict:
    """Model options (for :func:`optembed_ext.models.build_model`) from :func:`add_model_arguments`."""
    return {
        "mlp_dims": int_list(args.mlp_dims),
        "dropout": args.dropout,
        "batch_norm": args.batch_norm,
        "cross_layers": args.cross_layers,
        "attention_layers": args.attention_layers,
        "num_heads": args.num_heads,
        "attention_dim": args.attention_dim,
        "use_mlp": args.use_mlp,
    }


def require(args: argparse.Namespace, *names: str) -> None:
    """Raise SystemExit naming each option that is missing from both the command line and the config file."""
    missing = [n for n in names if getattr(args, n, None) is None]
    if missing:
        opts = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise SystemExit(f"error: {opts} required (on the command line or in the --config file)")


def load_data_from_args(args: argparse.Namespace, progress: bool | None = None, lazy: bool | None = None):
    """``optembed_ext.data.load_dataset`` with the options of :func:`add_data_arguments` (``lazy``: splits that
    read the cached arrays only when used)."""
    require(args, "dataset")
    spec = getattr(args, "spec", None)
    kwargs = {"cache_dir": args.cache_dir, "split": args.split, "seed": args.data_seed, "max_rows": args.max_rows,
              "strict": bool(getattr(args, "strict", False)),
              "progress": bool(getattr(args, "progress", True) if progress is None else progress)}
    if args.min_count is not None:
        kwargs["min_count"] = args.min_count
    if getattr(args, "preset", None) is not None:
        kwargs["preset"] = args.preset
    if lazy is not None and args.dataset != "synthetic":
        kwargs["lazy"] = lazy
    if args.num_samples is not None:
        if args.dataset != "synthetic":
            raise SystemExit("error: --num-samples applies to --dataset synthetic only")
        kwargs["num_samples"] = args.num_samples
    return load_any(args.dataset, args.data_dir, spec=spec, **kwargs)


def load_any(dataset: str, data_dir, *, spec=None, split=None, seed=None, **kwargs):
    """``optembed_ext.data.load_dataset``, or for ``dataset == "csv"`` the file ``data_dir`` described by the
    feature ``spec`` (:func:`optembed_ext.data.generic.load_generic`; the spec's split and seed unless given)."""
    if str(dataset).strip().lower() != "csv":
        if spec is not None:
            raise SystemExit("error: --spec applies to --dataset csv only")
        from ..data import load_dataset

        return load_dataset(dataset, data_dir, split="random" if split is None else split,
                            seed=2022 if seed is None else seed, **kwargs)
    if not spec or not data_dir:
        raise SystemExit("error: --dataset csv needs --spec (the YAML feature spec) and --data-dir (the CSV, TSV or "
                         "Parquet file it describes)")
    unknown = set(kwargs) - {"cache_dir", "min_count", "strict", "max_rows", "progress", "lazy", "ratios"}
    if unknown:
        raise SystemExit(f"error: --dataset csv takes its rules from the spec; not applicable: {sorted(unknown)}")
    from ..data.generic import load_generic

    return load_generic(spec, data_dir, split=split, seed=seed, **kwargs)


#: options that do not change a run's results: a rerun may change them and still resume
NEUTRAL_OPTIONS = frozenset({"out", "progress", "resume", "config", "log-level", "cache-dir", "checkpoint-every",
                             "device", "eval-batch-size"})


def open_run_dir(out, name: str, command: str, options: dict, *, resume: bool = True,
                 neutral: frozenset = frozenset()) -> Path:
    """The run folder for ``command``: a new one, or ``out``. With ``resume`` an existing folder is continued
    only when it was made with the same result-affecting ``options`` (its ``fingerprint.json``); otherwise a
    :class:`~optembed_ext.train.checkpoint.RunFolderError` names the differing options. Without ``resume`` the
    folder is emptied and started over."""
    from ..train import distributed

    run_dir = None
    if distributed.is_main():  # under torchrun rank 0 sets the folder up, the others take its path
        run_dir = make_run_dir(out, name=name)
        if not resume:
            clear_run_dir(run_dir)
        skip = NEUTRAL_OPTIONS | set(neutral)
        check_fingerprint(run_dir, {"command": command,
                                    "options": {k.replace("_", "-"): v for k, v in options.items()
                                                if k.replace("_", "-") not in skip}},
                          what=f"'{command}' run")
        run_dir = str(run_dir)
    return Path(distributed.broadcast_object(run_dir))


def start_run(args: argparse.Namespace, command: str, *, neutral=(), resumable: bool = True) -> Path:
    """Create (or resume) the run folder and write ``config.yaml`` (the merged options). ``neutral``: options
    besides :data:`NEUTRAL_OPTIONS` that a resumed run may change; ``resumable=False`` for a command whose folder
    holds only its record (``preprocess``)."""
    name = f"{command}-{getattr(args, 'dataset', None) or 'run'}"
    if getattr(args, "model", None):
        name += f"-{args.model}"
    options = args_to_config(args)
    if resumable:
        run_dir = open_run_dir(getattr(args, "out", None), name, command, options,
                               resume=bool(getattr(args, "resume", True)), neutral=frozenset(neutral))
    else:
        from ..train import distributed

        path = str(make_run_dir(getattr(args, "out", None), name=name)) if distributed.is_main() else None
        run_dir = Path(distributed.broadcast_object(path))
    save_yaml(run_dir / "config.yaml", {"command": command, **options})
    argv = getattr(args, "_argv", None)
    if argv is None:
        argv = sys.argv[1:]
    append_log(run_dir, f"optembed {' '.join(str(a) for a in argv)}".rstrip())
    return run_dir


def dataset_summary(data) -> dict:
    fm = data.feature_map
    summary = {"dataset": fm.dataset, "num_fields": fm.num_fields, "num_features": fm.num_features,
               "field_names": list(fm.field_names), "cardinalities": list(fm.cardinalities)}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        summary[f"{name}_size"] = len(split)
        summary[f"{name}_positive_rate"] = float(split.y.mean()) if len(split) else float("nan")
    info = getattr(data, "info", None) or {}
    if "stats" in info:  # raw datasets: where the cache is and what preprocessing kept, filtered and skipped
        stats = info["stats"]
        summary["cache_path"] = info.get("cache_path")
        summary["from_cache"] = info.get("from_cache")
        summary["preprocessing"] = {k: stats[k] for k in ("lines", "header_lines", "rows_read", "rows_kept",
                                                          "filtered", "blank_lines", "padded_rows", "malformed",
                                                          "malformed_by_reason", "malformed_examples", "min_count",
                                                          "compression", "side_malformed",
                                                          "side_malformed_by_reason", "side_malformed_examples")
                                    if k in stats}
    return summary


# ------------------------------------------------------------------------------------ dataclass options
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


def dataclass_values(args: argparse.Namespace, dests: dict[str, str], fixed: dict | None = None) -> dict:
    """The dataclass fields given on the command line or in the config file (``{field: value}``)."""
    values = {name: getattr(args, dest) for name, dest in dests.items() if hasattr(args, dest)}
    values.update(fixed or {})
    return values


def fail(err: Exception) -> SystemExit:
    """A one-line ``error: ...`` exit for a user mistake reported by the library."""
    return SystemExit(f"error: {err}")
