"""OptEmbed end to end on generated Criteo rows (paper preprocessing), checked against the planted label model.

Step 1 (shell): the search on the first 5M rows of the full-size generated file, bounded for a 2-core machine
(one epoch per phase capped at 250 steps of 2048 samples, 3 generations; the 8:1:1 split replaced by 96:2:2 so
that the evolution scores its candidates on 100,000 validation rows; no uniform baseline, no export):

    optembed generate --format criteo --rows 45840617 --out /tmp/criteo/train.txt        # ~11 GB
    # or only its first 5M rows, the same bytes (every 250k-row chunk has its own seeded generator): ~1.2 GB
    optembed generate --format criteo --rows 5000000 --out /tmp/criteo/train.txt
    optembed search --dataset criteo --data-dir /tmp/criteo/train.txt --max-rows 5000000 \\
        --cache-dir /tmp/criteo/cache5m --dataset-kwargs '{preset: paper, ratios: [0.96, 0.02, 0.02]}' \\
        --model deepfm --model-cfg '{mlp_dims: [256, 128]}' --epochs 1 --max-steps-per-epoch 250 \\
        --batch-size 2048 --generations 3 --optimizer fused_adam --threshold-lr 10 --baseline false \\
        --export false --measure-speedup false --out /tmp/criteo/run5m

(``--alpha 1e-3 --optimizer fused_adam_lazywd --weight-decay 1e-5`` is the setting that also prunes inside the
informative fields, see RESULTS.md; ``--baseline true`` adds the uniform model.)

Step 2 (this script): read the run's ``optembed_result.pt`` and the generator's ``FILE.planted.json`` and print,
for the informative and the noise fields of the planted model, the share of embedding rows kept and the searched
dims; with ``--cache`` (the run's cache folder) also the kept share by how often a value occurs in the cached
rows (rare values first), for both kinds of fields, and, per informative categorical field, the kept share of
the values that carry label weight in the planted model against the values that carry none.

    python benchmarks/e2e_criteo.py --run /tmp/criteo/run5m --planted /tmp/criteo/train.txt.planted.json \\
        --cache /tmp/criteo/cache5m/criteo-<key>
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from optembed_ext.results import load_search_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--planted", help="FILE.planted.json of the generator (default: the criteo model, which does not "
                                      "depend on the seed or the row count)")
    ap.add_argument("--cache", help="the run's cache folder (X.npy): kept share by value frequency")
    ap.add_argument("--json")
    args = ap.parse_args()
    res = load_search_result(args.run)
    if args.planted:
        planted = json.loads(open(args.planted).read())["planted"]
    else:
        from optembed_ext.data.generate import planted_model

        planted = planted_model("criteo")
    fmap = res["feature_map"]
    mask = res["row_mask"].numpy()
    offsets = np.asarray(fmap.offsets)
    rows = []
    for f, name in enumerate(fmap.field_names):
        lo, hi = offsets[f], offsets[f] + fmap.cardinalities[f]
        kept = int(mask[lo:hi].sum())
        kind = "informative" if name in planted["informative_fields"] else "noise"
        rows.append({"field": name, "kind": kind, "rows": int(hi - lo), "kept": kept, "kept_share": kept / (hi - lo),
                     "dim": int(res["field_dims"][f])})
    out = {"metrics": res["metrics"], "fields": rows}
    for kind in ("informative", "noise"):
        sel = [r for r in rows if r["kind"] == kind]
        tot, kept = sum(r["rows"] for r in sel), sum(r["kept"] for r in sel)
        out[kind] = {"fields": len(sel), "rows": tot, "kept": kept, "kept_share": kept / max(tot, 1),
                     "mean_dim": float(np.mean([r["dim"] for r in sel]))}
        print(f"{kind:12s} {len(sel):2d} fields  rows kept {kept:,} / {tot:,} ({100 * kept / max(tot, 1):.1f}%)  "
              f"mean dim {out[kind]['mean_dim']:.1f}")
    total = sum(r["rows"] for r in rows)
    print(f"all          {len(rows)} fields  rows kept {int(mask.sum()):,} / {total:,} "
          f"({100 * mask.sum() / total:.1f}%)")
    for r in rows:
        print(f"  {r['field']:4s} {r['kind']:11s} rows {r['rows']:>9,}  kept {100 * r['kept_share']:5.1f}%  "
              f"dim {r['dim']}")
    if args.cache:
        out["by_frequency"] = by_frequency(args.cache, mask, fmap, [r["kind"] for r in rows])
        out["by_signal"] = by_signal(args.cache, mask, fmap)
    print("metrics:", json.dumps(res["metrics"], default=str)[:800])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


BUCKETS = ((2, 3), (4, 10), (11, 100), (101, None))


def by_frequency(cache: str, mask: np.ndarray, fmap, kinds: list[str]) -> dict:
    """Kept share of the embedding rows by the number of cached rows holding the value (every row of ``X.npy``),
    for informative and noise fields; each field's OOV and empty rows are left out."""
    X = np.load(f"{cache}/X.npy", mmap_mode="r")
    counts = np.zeros(fmap.num_features, dtype=np.int64)
    for a in range(0, X.shape[0], 1 << 20):
        counts += np.bincount(np.asarray(X[a:a + (1 << 20)]).ravel(), minlength=fmap.num_features)
    offsets = np.asarray(fmap.offsets)
    kind_of = np.empty(fmap.num_features, dtype=object)
    special = np.zeros(fmap.num_features, dtype=bool)
    for f, kind in enumerate(kinds):
        kind_of[offsets[f]:offsets[f] + fmap.cardinalities[f]] = kind
        special[offsets[f]:offsets[f] + 2] = True  # OOV and empty
    out = {}
    for kind in ("informative", "noise"):
        out[kind] = {}
        for lo, hi in BUCKETS:
            sel = (kind_of == kind) & ~special & (counts >= lo) & (counts <= (hi if hi is not None else counts.max()))
            n, kept = int(sel.sum()), int(mask[sel].sum())
            label = f"{lo}-{hi}" if hi is not None else f">={lo}"
            out[kind][label] = {"rows": n, "kept": kept, "kept_share": kept / max(n, 1)}
            print(f"  {kind:11s} values seen {label:>6s} times: {n:>9,} rows, kept {100 * kept / max(n, 1):5.1f}%")
    return out


def by_signal(cache: str, mask: np.ndarray, fmap) -> dict:
    """Kept share of the values of the informative categorical fields that carry label weight in the planted model
    (its ``useful`` head ranks) against the values of the same fields that carry none (every rarer rank), found by
    regenerating the head ranks' tokens and looking them up in the cache's vocabulary (``vocab.json``)."""
    from optembed_ext.data.generate import _mix32, field_models

    vocab = json.loads(open(f"{cache}/vocab.json").read())
    offsets = dict(zip(fmap.field_names, np.asarray(fmap.offsets)))
    useful_rows = no_signal_rows = 0
    useful_kept = no_signal_kept = 0
    per_field = {}
    for m in field_models("criteo"):
        if not m.useful or m.name not in vocab:
            continue
        tokens = {f"{int(h):08x}" for h in _mix32(np.arange(1, m.useful + 1, dtype=np.int64), m.salt)}
        ids = np.arange(2, len(vocab[m.name]), dtype=np.int64)  # local ids 0 and 1 are OOV and empty
        is_useful = np.asarray([vocab[m.name][i] in tokens for i in ids], dtype=bool)
        kept = mask[offsets[m.name] + ids]
        u, n = int(is_useful.sum()), int((~is_useful).sum())
        uk, nk = int(kept[is_useful].sum()), int(kept[~is_useful].sum())
        useful_rows += u
        no_signal_rows += n
        useful_kept += uk
        no_signal_kept += nk
        per_field[m.name] = {"useful": u, "useful_kept": uk, "no_signal": n, "no_signal_kept": nk}
        print(f"  {m.name:4s} values with label weight {u:>7,} kept {100 * uk / max(u, 1):5.1f}%   "
              f"without {n:>7,} kept {100 * nk / max(n, 1):5.1f}%")
    print(f"informative categorical values with label weight: {useful_rows:,}, kept "
          f"{100 * useful_kept / max(useful_rows, 1):.1f}%; without: {no_signal_rows:,}, kept "
          f"{100 * no_signal_kept / max(no_signal_rows, 1):.1f}%")
    return {"useful": useful_rows, "useful_kept": useful_kept, "no_signal": no_signal_rows,
            "no_signal_kept": no_signal_kept, "fields": per_field}


if __name__ == "__main__":
    main()
