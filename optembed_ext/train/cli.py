"""``optembed preprocess`` and ``optembed train``, plus argument helpers shared by the other subcommands.

Every option has a long name; a YAML file passed with ``--config`` uses those names as keys (``embed-dim: 16``)
and the command line wins over it. A run writes a folder (``--out``, default ``runs/<command>-<dataset>-<time>``)
with ``config.yaml`` (the merged options, reusable as ``--config``), ``metrics.json`` and ``log.txt``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from .config import TrainConfig, append_log, make_run_dir, save_json, save_yaml

logger = logging.getLogger(__name__)

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
    """``--dataset --data-dir --cache-dir --min-count --split --data-seed --max-rows --strict --num-samples``."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", help="criteo, avazu, kdd12, movielens1m, movielens100k or synthetic (required)")
    g.add_argument("--data-dir", help="folder (or file) of the raw dataset")
    g.add_argument("--cache-dir", help="folder of the preprocessing cache (encoded arrays + feature map)")
    g.add_argument("--min-count", type=int, default=None,
                   help="values seen fewer times become the field's OOV id (default: the loader's)")
    g.add_argument("--split", default="random", help="random or sequential train/val/test split")
    g.add_argument("--data-seed", type=int, default=2022, help="seed of the random split / synthetic data")
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
                        "fused_sgd, fused_adagrad, fused_adam")
    g.add_argument("--embedding-lr", type=float, default=d.embedding_lr,
                   help="learning rate of the embedding table (default: --lr)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="epochs without a better validation AUC before stopping")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=d.deterministic,
                   help="torch.use_deterministic_algorithms during training")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                   help="tqdm progress bars")
    g.add_argument("--max-steps-per-epoch", type=int, default=d.max_steps_per_epoch)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this value")
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


def load_data_from_args(args: argparse.Namespace, progress: bool | None = None):
    """``optembed_ext.data.load_dataset`` with the options of :func:`add_data_arguments`."""
    from ..data import load_dataset

    require(args, "dataset")
    kwargs = {"cache_dir": args.cache_dir, "split": args.split, "seed": args.data_seed, "max_rows": args.max_rows,
              "strict": bool(getattr(args, "strict", False)),
              "progress": bool(getattr(args, "progress", True) if progress is None else progress)}
    if args.min_count is not None:
        kwargs["min_count"] = args.min_count
    if args.num_samples is not None:
        if args.dataset != "synthetic":
            raise SystemExit("error: --num-samples applies to --dataset synthetic only")
        kwargs["num_samples"] = args.num_samples
    return load_dataset(args.dataset, args.data_dir, **kwargs)


def start_run(args: argparse.Namespace, command: str) -> Path:
    """Create the run folder and write ``config.yaml`` (the merged options)."""
    name = f"{command}-{getattr(args, 'dataset', None) or 'run'}"
    if getattr(args, "model", None):
        name += f"-{args.model}"
    run_dir = make_run_dir(getattr(args, "out", None), name=name)
    save_yaml(run_dir / "config.yaml", {"command": command, **args_to_config(args)})
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
        summary["preprocessing"] = {k: stats[k] for k in ("rows_read", "rows_kept", "filtered", "blank_lines",
                                                          "padded_rows", "malformed", "malformed_by_reason",
                                                          "malformed_examples", "min_count") if k in stats}
    return summary


# -------------------------------------------------------------------------------------------- commands
def cmd_preprocess(args: argparse.Namespace) -> int:
    require(args, "dataset")
    run_dir = start_run(args, "preprocess")
    start = time.perf_counter()
    data = load_data_from_args(args)
    seconds = time.perf_counter() - start
    summary = {"command": "preprocess", **dataset_summary(data), "cache_dir": args.cache_dir, "seconds": seconds}
    save_json(run_dir / "metrics.json", summary)
    msg = (f"{summary['dataset']}: {summary['num_fields']} fields, {summary['num_features']} features, "
           f"train/val/test {summary['train_size']}/{summary['val_size']}/{summary['test_size']} "
           f"({seconds:.1f}s)")
    pre = summary.get("preprocessing")
    if pre is not None:
        msg += (f"; {pre.get('rows_read', 0)} rows read, {pre.get('filtered', 0)} filtered, "
                f"{pre.get('malformed', 0)} malformed rows skipped")
    append_log(run_dir, msg)
    print(msg)
    print(f"run folder: {run_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..models import MODELS, build_model
    from ..nn import UniformEmbedding
    from .checkpoint import seed_everything
    from .trainer import Trainer

    require(args, "dataset")
    if args.model not in MODELS:
        raise SystemExit(f"error: --model must be one of {', '.join(MODELS)}, got {args.model!r}")
    config = train_config_from_args(args)
    run_dir = start_run(args, "train")
    data = load_data_from_args(args)
    fm = data.feature_map
    append_log(run_dir, f"data: {fm.dataset} {fm.num_fields} fields {fm.num_features} features, "
                        f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}")
    seed_everything(config.seed)
    embedding = UniformEmbedding(fm, args.embed_dim, init=args.init, sparse=args.sparse_grad)
    model = build_model(args.model, fm, embedding, **model_kwargs_from_args(args))
    trainer = Trainer(model, data, config, run_dir=run_dir)
    result = trainer.fit(resume=args.resume)
    metrics = {"command": "train", "dataset": fm.dataset, "model": args.model, "method": "uniform",
               "embed_dim": args.embed_dim, "num_fields": fm.num_fields, "num_features": fm.num_features,
               "train_size": len(data.train), "val_size": len(data.val), "test_size": len(data.test), **result}
    save_json(run_dir / "metrics.json", metrics)
    print(f"{fm.dataset} {args.model}: best epoch {result['best_epoch']} val AUC {result['best_val_auc']:.4f} "
          f"test AUC {result['test_auc']:.4f} test logloss {result['test_logloss']:.4f} "
          f"embedding params {result['num_params']}")
    print(f"run folder: {run_dir}")
    return 0


def register(subparsers) -> None:
    """Add the ``preprocess`` and ``train`` subcommands."""
    p = subparsers.add_parser("preprocess", help="encode a raw dataset into the preprocessing cache",
                              description="Read a raw dataset, build the vocabularies and write the cache.")
    add_data_arguments(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    add_out_argument(p)
    p.set_defaults(func=cmd_preprocess)

    t = subparsers.add_parser("train", help="train a CTR model with a plain (uniform) embedding table",
                              description="Train a CTR model with a uniform embedding table; early stopping on "
                                          "validation AUC; reports test AUC at the best epoch.")
    add_data_arguments(t)
    add_model_arguments(t)
    t.add_argument("--init", default="xavier", choices=("xavier", "normal"),
                   help="embedding initialisation (default xavier, as OptEmbed)")
    t.add_argument("--sparse-grad", action=argparse.BooleanOptionalAction, default=False,
                   help="sparse gradients for the embedding table (SparseAdam with --optimizer adam)")
    add_train_arguments(t)
    t.set_defaults(func=cmd_train)
