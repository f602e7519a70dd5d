"""OptEmbed end to end on generated Criteo rows (paper preprocessing), checked against the planted label model.

Step 1 (shell; the full run this benchmark is meant for: 5M rows of the full-size generated file):

    optembed generate --format criteo --rows 45840617 --out /tmp/criteo/train.txt        # ~11 GB
    optembed search --dataset criteo --data-dir /tmp/criteo/train.txt --max-rows 5000000 \\
        --cache-dir /tmp/criteo/cache --dataset-kwargs '{preset: paper}' --model deepfm \\
        --model-cfg '{mlp_dims: [256, 128]}' --epochs 1 --batch-size 2048 --generations 5 \\
        --optimizer fused_adam --out /tmp/criteo/run5m

Step 2 (this script): read the run's ``optembed_result.pt`` and the generator's ``FILE.planted.json`` and print,
for the informative and the noise fields of the planted model, the share of rows kept and the searched dims,
and for the informative fields the kept share among their useful (planted, frequent) values vs the others.

    python benchmarks/e2e_criteo.py --run /tmp/criteo/run5m --planted /tmp/criteo/train.txt.planted.json
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
    print("metrics:", json.dumps(res["metrics"], default=str)[:800])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
