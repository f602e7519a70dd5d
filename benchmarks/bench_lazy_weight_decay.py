"""Lazy weight decay vs dense Adam: sparsity and AUC of the OptEmbed supernet phase.

Dense Adam with L2 weight decay (the authors' optimizer, ``optimizer: adam``) decays every table row at every step,
so rows that batches rarely touch shrink and fall below the field thresholds. The fused sparse optimizers skip the
decay of untouched rows (``fused_adam``); ``fused_adam_lazywd`` (and ``fused_bwd_adam_lazywd``) catches each row up
on the steps it skipped when it is next touched. This script trains the supernet phase of a shipped OptEmbed
config once per optimizer and seed (same data, same initial weights per seed) and reports the kept rows of the best
epoch's row mask, the table sparsity, the mean L1 row norm, and test AUC / log loss. The lazy runs call
``optimizer.catch_up()`` at the end of every epoch (before validation picks the best row mask) so that every row
carries the decay of every step, as the dense run's rows do.

    python benchmarks/bench_lazy_weight_decay.py --config configs/optembed_ml100k_deepfm.yaml \\
        --data-dir ../shared/data/ml-100k --seeds 0 1 --weight-decay 5e-5
    python benchmarks/bench_lazy_weight_decay.py --config configs/optembed_synthetic.yaml --num-samples 100000 \
        --epochs 2 --seeds 0
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import yaml

from optembed_ext.cli.search import load_data
from optembed_ext.search.optembed import OptEmbedConfig, build_optembed_model
from optembed_ext.search.optembed.callbacks import OptEmbedSupernetCallback
from optembed_ext.train import TrainConfig, Trainer
from optembed_ext.train.callbacks import Callback


class CatchUpAtEpochEnd(Callback):
    """Calls ``trainer.optimizer.catch_up()`` after the last batch of every epoch (before validation)."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.count = 0

    def on_batch_end(self, trainer, loss: float) -> None:
        self.count += 1
        if self.count % self.steps_per_epoch == 0:
            trainer.optimizer.catch_up()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--optimizers", nargs="+", default=["adam", "fused_adam", "fused_adam_lazywd"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=None, help="supernet epochs (default: the config's)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: the config's")
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=None, help="synthetic data: samples to generate")
    p.add_argument("--out", default=None, help="JSON file of the results")
    args = p.parse_args(argv)

    values = {str(k).replace("-", "_"): v for k, v in yaml.safe_load(open(args.config)).items()}
    opts = {k: values.pop(k, None) for k in ("dataset", "data_dir", "cache_dir", "model", "dataset_kwargs",
                                             "max_rows", "min_count", "data_seed", "out", "resume")}
    if args.data_dir:
        opts["data_dir"] = args.data_dir
    if args.max_rows:
        opts["max_rows"] = args.max_rows
    if args.num_samples:
        opts["dataset_kwargs"] = {**(opts.get("dataset_kwargs") or {}), "num_samples": args.num_samples}
    base = {k: v for k, v in values.items() if k in OptEmbedConfig.__dataclass_fields__}
    if args.weight_decay is not None:
        base["weight_decay"] = args.weight_decay
    data = load_data(opts)
    n_train = len(data.train.y)
    print(f"{opts['dataset']}: {n_train} training samples, {data.feature_map.num_features} rows, "
          f"weight decay {base.get('weight_decay')}, torch threads {torch.get_num_threads()}", flush=True)
    rows = []
    for seed in args.seeds:
        for name in args.optimizers:
            config = OptEmbedConfig.from_dict({**base, "optimizer": name, "seed": int(base.get("seed", 0)) + seed})
            epochs = args.epochs or config.epochs
            torch.manual_seed(config.seed)
            model = build_optembed_model(opts["model"], data.feature_map, config)
            cb = OptEmbedSupernetCallback(model.embedding, sample_dims=True, seed=config.seed)
            tc = TrainConfig(**{**config.train_config(epochs).to_dict(), "progress": False})
            rem = n_train % tc.batch_size
            steps = n_train // tc.batch_size if (rem == 1 and n_train > rem) else math.ceil(n_train / tc.batch_size)
            callbacks = [cb]
            if name.endswith("_lazywd"):
                callbacks.append(CatchUpAtEpochEnd(steps))
            t0 = time.perf_counter()
            res = Trainer(model, data, tc, callbacks=callbacks).fit(resume=False)
            emb = model.embedding
            mask = cb.best_row_mask if cb.best_row_mask is not None else emb.row_mask().cpu()
            with torch.no_grad():
                norms = emb.weight.detach().abs().sum(1)
            row = {"optimizer": name, "seed": seed, "kept_rows": int(mask.sum()), "rows": int(mask.numel()),
                   "kept_frac": float(mask.float().mean()), "sparsity": float(emb.sparsity()),
                   "mean_l1_norm": float(norms.mean()), "test_auc": res["test_auc"],
                   "test_logloss": res["test_logloss"], "best_epoch": cb.best_epoch,
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"{name:22s} seed {seed}: kept rows {row['kept_rows']}/{row['rows']} ({row['kept_frac']:.3f}) "
                  f"sparsity {row['sparsity']:.3f} mean |w|_1 {row['mean_l1_norm']:.3f} test AUC "
                  f"{row['test_auc']:.4f} logloss {row['test_logloss']:.4f} ({row['seconds']:.0f} s)", flush=True)
    print("\n| optimizer | kept rows | sparsity | mean row L1 norm | test AUC | test log loss |")
    print("|---|---|---|---|---|---|")
    for name in args.optimizers:
        rs = [r for r in rows if r["optimizer"] == name]

        def ms(key, fmt):
            vals = [r[key] for r in rs]
            sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            return f"{format(statistics.fmean(vals), fmt)} +- {format(sd, fmt)}" if len(vals) > 1 else \
                format(vals[0], fmt)
        print(f"| {name} | {ms('kept_frac', '.3f')} | {ms('sparsity', '.3f')} | {ms('mean_l1_norm', '.3f')} | "
              f"{ms('test_auc', '.4f')} | {ms('test_logloss', '.4f')} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
