"""``optembed train``: a CTR model with a plain (uniform) embedding table, the baseline line."""
from __future__ import annotations

import argparse

from ..train.config import append_log, save_json
from .common import (add_data_arguments, add_model_arguments, add_train_arguments, load_data_from_args,
                     model_kwargs_from_args, require, start_run, train_config_from_args)


def cmd_train(args: argparse.Namespace) -> int:
    from ..models import MODELS, build_model
    from ..nn import UniformEmbedding
    from ..train.checkpoint import seed_everything
    from ..train.trainer import Trainer

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
