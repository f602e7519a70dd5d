"""The MovieLens 100K comparison table over several seeds: every method of ``configs/compare_ml100k.yaml``
(uniform, OptEmbed with its ablations OptEmbed-E / OptEmbed-D and the model without retraining, PEP, AutoDim, QR,
AutoField) at the same shared settings, one ``optembed compare`` run per seed (the seed sets the split, the
initialisation and the batch order), then the mean and spread of every row.

    python benchmarks/ml100k_table.py --data-dir ../shared/data/ml-100k --out /tmp/ml100k_table --seeds 2022 2023 2024

Each seed's run folder (``OUT/seed<S>``) is resumable: a rerun reuses finished methods. ``--only-table`` rebuilds
the table from finished folders. Writes ``OUT/table.md`` and ``OUT/table.json`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("uniform", "optembed", "pep", "autodim", "qr", "autofield")


def run_seed(config: str, data_dir: str, out: Path, seed: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "optembed_ext", "compare", "--config", config, "--data-dir", data_dir,
           "--seed", str(seed), "--out", str(out), *extra]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return (math.nan,) * 4
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.fmean(vals), sd, min(vals), max(vals)


def aggregate(folders: dict[int, Path]) -> list[dict]:
    """One entry per (method, variant): the per-seed values and their mean / sd / min / max."""
    groups: dict[tuple, dict] = {}
    for seed, folder in folders.items():
        res = json.loads((folder / "results.json").read_text())
        rows = res["rows"] if isinstance(res, dict) else res
        for r in rows:
            key = (r["method"], str(r["variant"]))
            g = groups.setdefault(key, {"method": key[0], "variant": key[1], "seeds": {}})
            g["seeds"][seed] = {k: r.get(k) for k in ("auc", "logloss", "num_params", "sparsity", "train_seconds")}
    out = []
    for g in groups.values():
        per = list(g["seeds"].values())
        for k in ("auc", "logloss", "num_params", "sparsity", "train_seconds"):
            vals = [float(p[k]) if p.get(k) is not None else math.nan for p in per]
            g[k] = dict(zip(("mean", "sd", "min", "max"), _stats(vals)))
        out.append(g)
    ranks = {"retrain": 0, "no-retrain": 1, "E (rows only)": 2, "D (dims only)": 3}
    out.sort(key=lambda g: (ORDER.index(g["method"]) if g["method"] in ORDER else len(ORDER),
                            ranks.get(g["variant"], 9), -g["num_params"]["mean"], g["variant"]))
    return out


def format_table(groups: list[dict], seeds: list[int]) -> str:
    uni = [g for g in groups if g["method"] == "uniform"]
    ref = max(uni, key=lambda g: g["num_params"]["mean"]) if uni else None
    lines = [f"| method | variant | test AUC mean +- sd (min .. max), seeds {', '.join(map(str, seeds))} | dAUC vs "
             f"uniform {'-' if ref is None else ref['variant']} (same seed) | logloss mean +- sd | emb. params (mean) | sparsity mean "
             f"+- sd | train s (mean) |", "|" + "---|" * 8]
    for g in groups:
        a, ll, p, s, t = g["auc"], g["logloss"], g["num_params"], g["sparsity"], g["train_seconds"]
        # the AUC difference to the full uniform table, seed by seed (same split), then averaged
        if ref is not None:
            diffs = [g["seeds"][k]["auc"] - ref["seeds"][k]["auc"] for k in g["seeds"] if k in ref["seeds"]]
            dm, dsd, _, _ = _stats(diffs)
            d = f"{dm:+.4f} +- {dsd:.4f}"
        else:
            d = "-"
        lines.append(f"| {g['method']} | {g['variant']} | {a['mean']:.4f} +- {a['sd']:.4f} ({a['min']:.4f} .. "
                     f"{a['max']:.4f}) | {d} | {ll['mean']:.4f} +- {ll['sd']:.4f} | {p['mean']:,.0f} | "
                     f"{s['mean']:.3f} +- {s['sd']:.3f} | {t['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "compare_ml100k.yaml"))
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "ml-100k"))
    ap.add_argument("--out", default="/tmp/ml100k_table")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2022, 2023, 2024])
    ap.add_argument("--only-table", action="store_true", help="only aggregate finished seed folders")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more options for optembed compare")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    folders = {s: out / f"seed{s}" for s in args.seeds}
    if not args.only_table:
        for s, f in folders.items():
            secs = run_seed(args.config, args.data_dir, f, s, extra)
            print(f"seed {s}: {secs:.0f} s", flush=True)
    done = {s: f for s, f in folders.items() if (f / "results.json").is_file()}
    groups = aggregate(done)
    table = format_table(groups, sorted(done))
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps({"seeds": sorted(done), "rows": groups}, indent=1, default=str))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
