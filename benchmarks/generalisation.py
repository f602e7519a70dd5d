"""Does the shipped MovieLens config hold on MovieLens-format data it was not tuned on?

Builds extra data sets from what is on the machine, runs ``optembed search`` with
``configs/optembed_ml100k_deepfm.yaml`` as shipped (only the data set, the seed and the output folder change;
``--export false --measure-speedup false`` skip the export and the timing, which do not change any metric) for
several seeds, and writes the table of uniform vs OptEmbed vs OptEmbed without retraining (test AUC, sparsity).

Data sets (written in the MovieLens-1M ``.dat`` format and read by the ``movielens1m`` loader, except the synthetic
one):

- ``ml100k-recoded``: MovieLens 100K re-encoded with other fields: age as the ML-1M age groups (7 values instead
  of 61 ages), zip as its first 3 digits, genres as the movie's first genre only, occupation as its ML-1M-style
  code; random 8:1:1 split.
- ``ml100k-userdisjoint``: MovieLens 100K with its own fields, users shuffled and the ratings file ordered by user
  so that the sequential 8:1:1 split (``split: sequential``) puts every user in one split (only the users on the two
  cuts straddle): the test users' ids are never trained (cold start), their rows are pure noise.
- ``synthetic-ml``: the synthetic generator at a MovieLens-1M shape (8 fields with ML-1M cardinalities 6040 /
  3706 / 2 / 7 / 21 / 3439 / 81 / 301, 6 informative fields with planted pairwise interactions, 2 noise fields,
  100k samples).

    python benchmarks/generalisation.py --data-dir ../shared/data/ml-100k --work /tmp/generalisation --seeds 0 1 2

Run folders are resumable (a rerun reuses finished runs); ``--only-table`` rebuilds the table. Writes
``WORK/table.md`` and ``WORK/table.json``.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "optembed_ml100k_deepfm.yaml"
ML1M_AGES = (1, 18, 25, 35, 45, 50, 56)  # ML-1M age groups: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
SYNTHETIC_ML = {"num_samples": 100000, "num_fields": 8, "vocab_sizes": [6040, 3706, 2, 7, 21, 3439, 81, 301],
                "informative_fields": [0, 1, 3, 4, 6, 7], "interaction_strength": 2.0}
DATASETS = ("ml100k-recoded", "ml100k-userdisjoint", "synthetic-ml")


# ------------------------------------------------------------------------------------------ data sets
def _read_ml100k(src: Path):
    users = {}
    for line in (src / "u.user").read_text(encoding="latin-1").splitlines():
        uid, age, gender, occ, zipc = line.split("|")
        users[uid] = (int(age), gender, occ, zipc)
    genres = [ln.split("|")[0] for ln in (src / "u.genre").read_text(encoding="latin-1").splitlines() if ln]
    movies = {}
    for line in (src / "u.item").read_text(encoding="latin-1").splitlines():
        v = line.split("|")
        names = [g for g, flag in zip(genres, v[5:]) if flag == "1"]
        movies[v[0]] = (v[1], v[2], names)
    ratings = [ln.split("\t") for ln in (src / "u.data").read_text(encoding="latin-1").splitlines() if ln]
    return users, movies, ratings


def _title_with_year(title: str, release: str) -> str:
    if "(" in title and title.rstrip().endswith(")"):
        return title
    year = release.strip()[-4:]
    return f"{title} ({year})" if year.isdigit() else title


def _age_group(age: int) -> int:
    return max(a for a in ML1M_AGES if age >= a) if age >= 18 else 1


def write_recoded(src: Path, out: Path) -> None:
    users, movies, ratings = _read_ml100k(src)
    out.mkdir(parents=True, exist_ok=True)
    occs = sorted({u[2] for u in users.values()})
    with open(out / "users.dat", "w", encoding="latin-1") as f:
        for uid, (age, gender, occ, zipc) in users.items():
            f.write(f"{uid}::{gender}::{_age_group(age)}::{occs.index(occ)}::{zipc[:3]}\n")
    with open(out / "movies.dat", "w", encoding="latin-1") as f:
        for mid, (title, release, names) in movies.items():
            f.write(f"{mid}::{_title_with_year(title, release)}::{names[0] if names else 'unknown'}\n")
    with open(out / "ratings.dat", "w", encoding="latin-1") as f:
        for uid, mid, r, ts in ratings:
            f.write(f"{uid}::{mid}::{r}::{ts}\n")


def write_userdisjoint(src: Path, out: Path, seed: int = 2022) -> dict:
    users, movies, ratings = _read_ml100k(src)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "users.dat", "w", encoding="latin-1") as f:
        for uid, (age, gender, occ, zipc) in users.items():
            f.write(f"{uid}::{gender}::{age}::{occ}::{zipc}\n")
    with open(out / "movies.dat", "w", encoding="latin-1") as f:
        for mid, (title, release, names) in movies.items():
            f.write(f"{mid}::{_title_with_year(title, release)}::{'|'.join(names)}\n")
    order = sorted(users, key=int)
    np.random.default_rng(seed).shuffle(order)
    by_user: dict[str, list] = {u: [] for u in order}
    for row in ratings:
        by_user[row[0]].append(row)
    with open(out / "ratings.dat", "w", encoding="latin-1") as f:
        for u in order:
            for uid, mid, r, ts in by_user[u]:
                f.write(f"{uid}::{mid}::{r}::{ts}\n")
    # which users the sequential 8:1:1 split of the kept rows (rating != 3) puts in more than one split
    kept = [u for u in order for row in by_user[u] if row[2] != "3"]
    n = len(kept)
    cuts = (int(0.8 * n), int(0.9 * n))
    straddle = sorted({kept[c - 1] for c in cuts if 0 < c < n and kept[c - 1] == kept[c]})
    return {"users": len(order), "kept_rows": n, "straddling_users": straddle}


def prepare(src: Path, work: Path) -> dict:
    info = {}
    data = work / "data"
    if not (data / "ml100k-recoded" / "ratings.dat").is_file():
        write_recoded(src, data / "ml100k-recoded")
    info["ml100k-userdisjoint"] = write_userdisjoint(src, data / "ml100k-userdisjoint")
    return info


def search_args(name: str, work: Path) -> list[str]:
    if name == "ml100k-recoded":
        return ["--dataset", "movielens1m", "--data-dir", str(work / "data" / name)]
    if name == "ml100k-userdisjoint":
        return ["--dataset", "movielens1m", "--data-dir", str(work / "data" / name), "--dataset-kwargs",
                "{split: sequential}"]
    if name == "synthetic-ml":
        return ["--dataset", "synthetic", "--dataset-kwargs", json.dumps(SYNTHETIC_ML)]
    raise ValueError(f"unknown data set {name!r}; known: {DATASETS}")


# ------------------------------------------------------------------------------------------ runs
def run(name: str, seed: int, work: Path, extra: list[str]) -> Path:
    out = work / "runs" / name / f"seed{seed}"
    if (out / "metrics.json").is_file():
        return out
    cmd = [sys.executable, "-m", "optembed_ext", "search", "--config", str(CONFIG), *search_args(name, work),
           "--cache-dir", str(work / "cache"), "--seed", str(seed), "--out", str(out), "--export", "false",
           "--measure-speedup", "false", *extra]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _ms(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def table(work: Path, names, seeds) -> str:
    lines = ["| data set | seeds | uniform AUC | OptEmbed AUC | w/o retraining AUC | OptEmbed - uniform | "
             "retrained - w/o | logloss uniform / OptEmbed / w/o | sparsity | kept rows | field dims (seed by seed) |",
             "|" + "---|" * 11]
    rows = []
    for name in names:
        runs = {}
        for s in seeds:
            f = work / "runs" / name / f"seed{s}" / "metrics.json"
            if f.is_file():
                runs[s] = json.loads(f.read_text())
        if not runs:
            continue
        get = lambda v, k: [r["variants"][v][k] for r in runs.values()]  # noqa: E731
        u, o, n = get("uniform", "test_auc"), get("optembed", "test_auc"), get("no_retrain", "test_auc")
        d_ou = [a - b for a, b in zip(o, u)]
        d_on = [a - b for a, b in zip(o, n)]
        sp = get("optembed", "sparsity")
        kept = [sum(r["kept_rows_per_field"]) / r["num_features"] for r in runs.values()]
        dims = " ; ".join("/".join(str(d) for d in r["field_dims"]) for r in runs.values())
        f = lambda v: "{:.4f} +- {:.4f}".format(*_ms(v))  # noqa: E731
        g = lambda v: "{:+.4f} +- {:.4f}".format(*_ms(v))  # noqa: E731
        ll = " / ".join(f"{_ms(get(v, 'test_logloss'))[0]:.4f}" for v in ("uniform", "optembed", "no_retrain"))
        lines.append(f"| {name} | {', '.join(map(str, runs))} | {f(u)} | {f(o)} | {f(n)} | {g(d_ou)} | {g(d_on)} | "
                     f"{ll} | "
                     f"{_ms(sp)[0]:.3f} +- {_ms(sp)[1]:.3f} | {_ms(kept)[0]:.3f} | {dims} |")
        rows.append({"dataset": name, "seeds": list(runs), "uniform": u, "optembed": o, "no_retrain": n,
                     "logloss": {v: get(v, "test_logloss") for v in ("uniform", "optembed", "no_retrain")},
                     "sparsity": sp, "kept_row_share": kept,
                     "thresholds": [r.get("thresholds") for r in runs.values()],
                     "kept_rows_per_field": [r["kept_rows_per_field"] for r in runs.values()],
                     "field_dims": [r["field_dims"] for r in runs.values()],
                     "cardinalities": next(iter(runs.values()))["cardinalities"],
                     "field_names": next(iter(runs.values()))["field_names"]})
    (work / "table.json").write_text(json.dumps(rows, indent=1))
    return "\n".join(lines) + "\n"


def planted(work: Path, seeds) -> str:
    """For ``synthetic-ml``: the searched row mask against the planted truth (rows kept in the informative and in
    the noise fields, planted useful rows pruned), seed by seed."""
    import torch

    from optembed_ext.data import load_dataset

    data = load_dataset("synthetic", None, seed=2022, progress=False, **SYNTHETIC_ML)  # --data-seed 2022
    fr = data.feature_map.field_of_row()
    inf = torch.isin(fr, torch.tensor(data.info["informative_fields"]))
    useful = torch.zeros(len(fr), dtype=torch.bool)
    useful[torch.as_tensor(data.info["useful_rows"])] = True
    lines = ["| seed | rows kept, informative fields | rows kept, noise fields | planted useful rows pruned | "
             "other rows pruned |", "|---|---|---|---|---|"]
    for s in seeds:
        f = work / "runs" / "synthetic-ml" / f"seed{s}" / "masks.pt"
        if not f.is_file():
            continue
        rm = torch.load(f, weights_only=False)["row_mask"].bool()
        lines.append(f"| {s} | {rm[inf].float().mean():.3f} | {rm[~inf].float().mean():.3f} | "
                     f"{(~rm[useful]).float().mean():.3f} | {(~rm[~useful]).float().mean():.3f} |")
    return "\n".join(lines) + "\n"


def _load(name: str, work: Path):
    from optembed_ext.data import load_dataset

    if name == "synthetic-ml":
        return load_dataset("synthetic", None, seed=2022, progress=False, **SYNTHETIC_ML)
    split = "sequential" if name == "ml100k-userdisjoint" else "random"
    return load_dataset("movielens1m", work / "data" / name, cache_dir=work / "cache", split=split, seed=2022,
                        progress=False)


def unseen_rows(work: Path, names, seeds) -> str:
    """Rows never looked up in the training split against rows that are: the share the searched row mask
    prunes of each (the cold-start users of the user-disjoint split are such rows)."""
    import torch

    lines = ["| data set | rows never in the training split | of them pruned (by seed) | rows seen in training | "
             "of them pruned (by seed) |", "|---|---|---|---|---|"]
    for name in names:
        masks = [work / "runs" / name / f"seed{s}" / "masks.pt" for s in seeds]
        masks = [torch.load(f, weights_only=False)["row_mask"].bool() for f in masks if f.is_file()]
        if not masks:
            continue
        data = _load(name, work)
        seen = torch.zeros(data.feature_map.num_features, dtype=torch.bool)
        seen[torch.as_tensor(data.train.X).flatten()] = True
        un = " / ".join(f"{(~m[~seen]).float().mean():.3f}" for m in masks) if (~seen).any() else "-"
        sn = " / ".join(f"{(~m[seen]).float().mean():.3f}" for m in masks)
        lines.append(f"| {name} | {int((~seen).sum())} | {un} | {int(seen.sum())} | {sn} |")
    return "\n".join(lines) + "\n"


def calibration(work: Path, names, seeds) -> str:
    """Mean predicted CTR on the test split of the model without retraining (the supernet's weights, both masks)
    and of the retrained one, next to the positive rate, with the retraining's best epoch."""
    import torch

    from optembed_ext.search.optembed import OptEmbedConfig, build_optembed_model

    lines = ["| data set | seed | positive rate | mean predicted CTR w/o retraining | retrained | retrain best epoch |",
             "|---|---|---|---|---|---|"]
    for name in names:
        data = None
        for s in seeds:
            run = work / "runs" / name / f"seed{s}"
            if not (run / "metrics.json").is_file():
                continue
            data = data if data is not None else _load(name, work)
            cfg = OptEmbedConfig.from_dict(json.loads((run / "metrics.json").read_text())["config"])
            masks = torch.load(run / "masks.pt", weights_only=False)
            X = torch.as_tensor(data.test.X)
            means = []
            for path in (run / "phases" / "supernet" / "supernet.pt", run / "phases" / "retrain" / "model.pt"):
                state = torch.load(path, weights_only=False)
                model = build_optembed_model("deepfm", data.feature_map, cfg)
                model.load_state_dict(state.get("state_dict", state))
                model.embedding.freeze(masks["row_mask"], masks["field_dims"])
                with torch.no_grad():
                    means.append(float(torch.sigmoid(model.eval()(X)).mean()))
            done = json.loads((run / "phases" / "retrain" / "metrics.json").read_text())
            best = done.get("best_epoch", (done.get("fit") or {}).get("best_epoch"))
            lines.append(f"| {name} | {s} | {float(data.test.y.mean()):.3f} | {means[0]:.3f} | {means[1]:.3f} | "
                         f"{best} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "ml-100k"))
    ap.add_argument("--work", default="/tmp/generalisation")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only-table", action="store_true")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more options for optembed search")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    if not args.only_table:
        info = prepare(Path(args.data_dir), work)
        print(json.dumps(info), flush=True)
        for s in args.seeds:  # every data set at one seed before the next seed
            for name in args.datasets:
                run(name, s, work, extra)
    text = table(work, args.datasets, args.seeds)
    text += "\nRows never seen in training vs seen, share pruned by the searched row mask:\n\n" + \
        unseen_rows(work, args.datasets, args.seeds)
    text += "\nCalibration on the test split:\n\n" + calibration(work, args.datasets, args.seeds)
    if "synthetic-ml" in args.datasets:
        text += "\nsynthetic-ml, searched row mask against the planted truth:\n\n" + planted(work, args.seeds)
    (work / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
