"""Controlled runs of OptEmbed's retraining phase on a finished search: which retraining helps, and why.

Takes a run folder of ``optembed search`` whose supernet and evolution phases are done, keeps its masks
(``m_e`` from the supernet, ``m_d`` from the evolution) and retrains the masked model under several variants,
each with several seeds (the seed sets the batch order, and the initial weights of the ``fresh`` variant):

- ``lottery``     the pipeline's default: the supernet's initial weights, the run's lr / weight decay / epochs;
- ``fresh``       new random weights;
- ``supernet``    warm start from the supernet's trained weights (fine-tuning with the masks fixed);
- ``lottery-lr/3`` and ``lottery-wd*10``: the lottery retrain with a third of the lr / ten times the weight decay;
- ``lottery-1ep`` one epoch only (no early-stopping choice at all).

For each run it reports test AUC, log loss, the best epoch and the calibration (mean predicted CTR / positive
rate of the test split), next to the "without retraining" model (supernet weights, masks applied) of the run.

    python benchmarks/retrain_study.py --run runs/ml100k-deepfm --data-dir ../shared/data/ml-100k --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from optembed_ext.cli.search import load_data
from optembed_ext.search.optembed import OptEmbedConfig, build_optembed_model
from optembed_ext.train import TrainConfig, Trainer

VARIANTS = {
    "lottery": {},
    "fresh": {"init": "fresh"},
    "supernet": {"init": "supernet"},
    "lottery-lr/3": {"lr_scale": 1 / 3},
    "lottery-wd*10": {"wd_scale": 10.0},
    "lottery-1ep": {"epochs": 1},
}


def _predict(model, split, batch_size=8192):
    model.eval()
    X = torch.as_tensor(split.X)
    out = []
    with torch.no_grad():
        for s in range(0, len(X), batch_size):
            out.append(torch.sigmoid(model(X[s:s + batch_size]).float()))
    return torch.cat(out).numpy().astype(np.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="finished optembed search run folder")
    p.add_argument("--data-dir", default=None, help="raw data folder (default: the run's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=None, help="JSON file of the results (default <run>/retrain_study.json)")
    args = p.parse_args(argv)

    run = Path(args.run)
    values = {str(k).replace("-", "_"): v for k, v in yaml.safe_load((run / "config.yaml").read_text()).items()}
    opts = {k: values.pop(k, None) for k in ("dataset", "data_dir", "cache_dir", "model", "dataset_kwargs",
                                             "max_rows", "min_count", "data_seed", "out", "resume")}
    if args.data_dir:
        opts["data_dir"] = args.data_dir
    config = OptEmbedConfig.from_dict({k: v for k, v in values.items() if k in OptEmbedConfig.__dataclass_fields__})
    data = load_data(opts)
    sup = torch.load(run / "phases" / "supernet" / "supernet.pt", map_location="cpu", weights_only=False)
    evo = json.loads((run / "phases" / "evolution" / "done.json").read_text())
    row_mask, dims = sup["row_mask"], evo["best_dims"]
    init = torch.load(run / "init_state.pt", map_location="cpu", weights_only=True)
    y_test = np.asarray(data.test.y, dtype=np.float64)

    results = {"run": str(run), "no_retrain": evo["no_retrain"], "positive_rate": float(y_test.mean()), "rows": []}
    print(f"without retraining: test AUC {evo['no_retrain']['test_auc']:.4f} "
          f"logloss {evo['no_retrain']['test_logloss']:.4f}")
    for name in args.variants:
        v = VARIANTS[name]
        for seed in args.seeds:
            torch.manual_seed(1000 + seed)
            model = build_optembed_model(opts["model"], data.feature_map, config)
            if v.get("init") == "supernet":
                model.load_state_dict(sup["state_dict"])
            elif v.get("init") != "fresh":
                model.load_state_dict(init, strict=False)
            model.embedding.freeze(row_mask, dims)
            epochs = v.get("epochs", config.retrain_epochs or config.epochs)
            tc = TrainConfig(**{**config.train_config(epochs).to_dict(), "seed": seed, "progress": False,
                                "lr": config.lr * v.get("lr_scale", 1.0),
                                "weight_decay": config.weight_decay * v.get("wd_scale", 1.0)})
            t0 = time.perf_counter()
            res = Trainer(model, data, tc).fit(resume=False)
            p_test = _predict(model, data.test)
            row = {"variant": name, "seed": seed, "test_auc": res["test_auc"], "test_logloss": res["test_logloss"],
                   "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
                   "val_auc": res["best_val_auc"], "mean_pred": float(p_test.mean()),
                   "seconds": time.perf_counter() - t0}
            results["rows"].append(row)
            print(f"{name:14s} seed {seed}: test AUC {row['test_auc']:.4f} logloss {row['test_logloss']:.4f} "
                  f"best epoch {row['best_epoch']} mean pred {row['mean_pred']:.3f} "
                  f"(positives {results['positive_rate']:.3f})", flush=True)
    summary = {}
    for name in args.variants:
        rs = [r for r in results["rows"] if r["variant"] == name]
        aucs, lls = [r["test_auc"] for r in rs], [r["test_logloss"] for r in rs]
        summary[name] = {"auc_mean": statistics.fmean(aucs), "auc_sd": statistics.pstdev(aucs),
                         "logloss_mean": statistics.fmean(lls), "logloss_sd": statistics.pstdev(lls),
                         "best_epochs": [r["best_epoch"] for r in rs]}
    results["summary"] = summary
    print("\n| retraining | test AUC (mean +- sd) | test logloss | best epochs |\n|---|---|---|---|")
    nr = evo["no_retrain"]
    print(f"| none (supernet weights) | {nr['test_auc']:.4f} | {nr['test_logloss']:.4f} | - |")
    for name, s in summary.items():
        print(f"| {name} | {s['auc_mean']:.4f} +- {s['auc_sd']:.4f} | {s['logloss_mean']:.4f} +- "
              f"{s['logloss_sd']:.4f} | {s['best_epochs']} |")
    out = Path(args.out) if args.out else run / "retrain_study.json"
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
