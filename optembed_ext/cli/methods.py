"""One subcommand per registered method (``optembed pep | autodim | qr | autofield | uniform | <yours>``).

Each takes the data, model and training options of ``optembed train`` plus the fields of the method's
configuration dataclass as long options (``--threshold-type``, ``--candidates 2,8,16``, ...); ``--config
file.yaml`` holds the same keys (``threshold-type: feature_dim``), the command line wins. A run writes a folder
(``--out``, default ``runs/<command>-<dataset>-<model>-<time>``) with ``config.yaml`` (the merged options,
reusable as ``--config``), ``metrics.json`` (result rows and the search outcome) and ``log.txt``, plus the trainer
run folders of the search and retraining stages.

``--dataset`` accepts the :func:`optembed_ext.data.load_dataset` names and the synthetic presets of the
harness (``synthetic-criteo``, ``synthetic-tiny``; see :data:`optembed_ext.search.compare.SYNTHETIC_PRESETS`).

    optembed pep --dataset movielens100k --data-dir ../shared/data/ml-100k --model deepfm --epochs 5 \\
        --target-sparsities 0.5,0.8,0.9 --out runs/pep-ml100k
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from ..train.config import append_log, save_json
from .common import (add_data_arguments, add_dataclass_arguments, add_model_arguments, add_train_arguments,
                     dataclass_values, fail, load_data_from_args, model_kwargs_from_args, require, start_run,
                     train_config_from_args)


def load_data(args: argparse.Namespace):
    """The dataset of ``--dataset``: a harness synthetic preset, or :func:`optembed_ext.data.load_dataset`."""
    from ..search.compare import SYNTHETIC_PRESETS

    require(args, "dataset")
    if args.dataset in SYNTHETIC_PRESETS and args.dataset != "synthetic":
        from ..data import make_synthetic

        kwargs = dict(SYNTHETIC_PRESETS[args.dataset])
        if args.num_samples is not None:
            kwargs["num_samples"] = int(args.num_samples)
        data = make_synthetic(seed=2022 if args.data_seed is None else args.data_seed,
                              split=args.split or "random", **kwargs)
        data.feature_map.dataset = args.dataset
        return data
    return load_data_from_args(args, progress=False)


def _cmd_method(name: str):
    def run(args: argparse.Namespace) -> int:
        from ..models import MODELS
        from ..search.base import get_method
        from ..search.common import RunSettings

        method_cls = get_method(name)
        command = method_cls.subcommand()
        if args.model not in MODELS:
            raise SystemExit(f"error: --model must be one of {', '.join(MODELS)}, got {args.model!r}")
        # fields that repeat a training option are taken from the training options
        fixed = {f: None for f in method_cls.shared_fields}
        try:
            method = method_cls(method_cls.config_from_dict(dataclass_values(args, args._method_fields, fixed)))
        except (TypeError, ValueError) as err:
            raise fail(err) from None
        settings = RunSettings(embed_dim=args.embed_dim, train=train_config_from_args(args),
                               model_cfg=model_kwargs_from_args(args))
        run_dir = start_run(args, command)
        t0 = time.perf_counter()
        data = load_data(args)
        fm = data.feature_map
        append_log(run_dir, f"data: {fm.dataset} {fm.num_fields} fields {fm.num_features} features, "
                            f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}")
        append_log(run_dir, f"{command} config: {dataclasses.asdict(method.config)}")
        res = method.run(data, args.model, settings, run_dir=run_dir)
        rows = [{"dataset": fm.dataset, "model": args.model, "seed": settings.train.seed, **r} for r in res.rows]
        save_json(run_dir / "metrics.json", {"command": command, "dataset": fm.dataset, "model": args.model,
                                              "method": name, "rows": rows, "search": res.search,
                                              "wall_seconds": time.perf_counter() - t0})
        for r in rows:
            msg = (f"{fm.dataset} {args.model} {name} {r['variant']}: test AUC {r['auc']:.4f} "
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


def add_method_parser(subparsers, method_cls) -> None:
    """The subcommand of one registered method: data, model, training and the method's own options."""
    command = method_cls.subcommand()
    p = subparsers.add_parser(command, help=method_cls.help, description=method_cls.help)
    add_data_arguments(p)
    add_model_arguments(p)
    add_train_arguments(p)
    fields = add_dataclass_arguments(p, method_cls.config_class, f"{command} options",
                                     skip=set(method_cls.shared_fields), prefix=command)
    if method_cls.train_defaults:
        p.set_defaults(**method_cls.train_defaults)
    p.set_defaults(func=_cmd_method(method_cls.name), _method_fields=fields)


def register(subparsers) -> None:
    """Add a subcommand for every registered method that has one (``Method.subcommand()``) and whose name is
    not taken by another command."""
    from ..search.base import registered_methods

    for method_cls in registered_methods().values():
        command = method_cls.subcommand()
        if command and command not in subparsers.choices:
            add_method_parser(subparsers, method_cls)
