"""Preprocessing throughput and peak memory on a generated Criteo file: our two engines and a peer.

Each measurement runs in a fresh subprocess (its own peak RSS, cold caches of Python objects); the page
cache is warm for every contender alike after the first read. Besides rows per second (wall clock) each line
gives rows per CPU-second of the process (all its threads): on a machine shared with other jobs the wall clock
depends on their load, the processor time much less. Peers: pytorch-fm's ``CriteoDataset``
(package ``torchfm``; needs ``lmdb``), which counts with Python dicts and writes one LMDB record per row.

Correctness before timing: the categorical vocabularies (values seen at least ``--min-count`` times per
field) of every contender must agree (pytorch-fm keeps the empty string as an ordinary value, we keep it
in its own slot; both are counted).

    python benchmarks/bench_preprocess.py --rows 1000000                 # all contenders, 1M rows
    python benchmarks/bench_preprocess.py --file /tmp/criteo/train.txt --contenders arrow   # full size
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

_OURS = textwrap.dedent("""
    import json, resource, sys, time
    from optembed_ext.data import preprocess
    path, cache, engine, mc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    t = time.perf_counter()
    r = preprocess("criteo", path, cache, min_count=mc, engine=engine, progress=False, force=True)
    dt = time.perf_counter() - t
    kept = [f["cardinality"] - 2 + (1 if f["empty_occurrences"] >= mc else 0) for f in r.stats["fields"][13:]]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rows": r.num_rows, "lines": r.stats["lines"], "seconds": dt,
                      "cpu_seconds": ru.ru_utime + ru.ru_stime, "peak_rss_gb": ru.ru_maxrss / 2**20,
                      "features": r.feature_map.num_features, "cat_vocab": kept,
                      "phases": r.stats.get("seconds")}))
""")

_TORCHFM = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    from torchfm.dataset.criteo import CriteoDataset
    path, cache, mc = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t = time.perf_counter()
    ds = CriteoDataset(path, cache, rebuild_cache=True, min_threshold=mc)
    dt = time.perf_counter() - t
    dims = ds.field_dims.astype(int).tolist()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rows": len(ds), "seconds": dt, "cpu_seconds": ru.ru_utime + ru.ru_stime,
                      "peak_rss_gb": ru.ru_maxrss / 2**20,
                      "features": int(sum(dims)), "cat_vocab": [d - 1 for d in dims[13:]]}))
""")


def run(code: str, args: list[str]) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", help="raw Criteo train.txt (default: generate --rows rows under /tmp)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--min-count", type=int, default=2)
    ap.add_argument("--contenders", default="arrow,python,torchfm")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    path = Path(args.file) if args.file else Path(tempfile.gettempdir()) / f"criteo-gen-{args.rows}.txt"
    if not path.exists():
        from optembed_ext.data.generate import generate_raw

        print(f"generating {args.rows} rows into {path}")
        generate_raw("criteo", args.rows, path, seed=0)
    size = path.stat().st_size
    results = {}
    for name in args.contenders.split(","):
        if name in ("arrow", "python"):
            res = run(_OURS, [str(path), str(work / f"cache-{name}"), name, str(args.min_count)])
        elif name == "torchfm":
            res = run(_TORCHFM, [str(path), str(work / "torchfm-lmdb"), str(args.min_count)])
        else:
            raise SystemExit(f"unknown contender {name}")
        res["rows_per_s"] = res["rows"] / res["seconds"]
        res["mb_per_s"] = size / res["seconds"] / 1e6
        res["rows_per_cpu_s"] = res["rows"] / res["cpu_seconds"]  # all threads: what the load of others leaves alone
        res["load_average"] = os.getloadavg()
        results[name] = res
        print(f"{name:8s} {res['rows']:>11,} rows  {res['seconds']:8.1f} s  {res['rows_per_s']:>10,.0f} rows/s  "
              f"{res['mb_per_s']:6.1f} MB/s  {res['rows_per_cpu_s']:>9,.0f} rows/CPU-s  peak RSS "
              f"{res['peak_rss_gb']:.2f} GiB  features {res['features']:,}  (load {res['load_average'][0]:.1f})",
              flush=True)
    if "arrow" in results:
        for name, res in results.items():
            if name != "arrow":
                print(f"arrow vs {name}: {results['arrow']['rows_per_s'] / res['rows_per_s']:.1f}x rows/s, "
                      f"{results['arrow']['rows_per_cpu_s'] / res['rows_per_cpu_s']:.1f}x rows per CPU-second")
    vocabs = {k: v["cat_vocab"] for k, v in results.items()}
    first = next(iter(vocabs.values()))
    agree = all(v == first for v in vocabs.values())
    print(f"categorical vocabularies (min count {args.min_count}) agree across contenders: {agree}")
    if not agree:
        for k, v in vocabs.items():
            print(f"  {k}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({"file": str(path), "bytes": size, "results": results,
                                               "vocab_agree": agree}, indent=1))
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
