"""``optembed preprocess``: encode a raw dataset into the preprocessing cache and report what was read.

``--dataset csv --spec spec.yaml --input FILE`` encodes any CSV/TSV/Parquet file described by a feature spec
(:mod:`optembed_ext.data.generic`); the split comes from the spec unless ``--split``/``--data-seed`` are given."""
from __future__ import annotations

import argparse
import time

from ..train.config import append_log, save_json
from .common import add_data_arguments, add_out_argument, dataset_summary, load_data_from_args, require, start_run


def cmd_preprocess(args: argparse.Namespace) -> int:
    require(args, "dataset")
    if args.input:
        if str(args.dataset).strip().lower() != "csv":
            raise SystemExit("error: --input applies to --dataset csv only (the file the --spec describes)")
        if args.data_dir and args.data_dir != args.input:
            raise SystemExit("error: give the file once: --input or --data-dir")
        args.data_dir = args.input
    if str(args.dataset).strip().lower() == "csv" and not (args.spec and args.data_dir):
        raise SystemExit("error: --dataset csv needs --spec (the YAML feature spec) and --input (the CSV, TSV or "
                         "Parquet file it describes)")
    run_dir = start_run(args, "preprocess", resumable=False)
    start = time.perf_counter()
    # lazy: the summary needs the split sizes and labels, not in-memory copies of X
    data = load_data_from_args(args, lazy=True)
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
        if not summary.get("from_cache"):
            import resource

            summary["rows_per_second"] = pre.get("rows_read", 0) / max(seconds, 1e-9)
            summary["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
            save_json(run_dir / "metrics.json", summary)
            msg += f"; {summary['rows_per_second']:,.0f} rows/s, peak RSS {summary['peak_rss_gib']:.2f} GiB"
        if pre.get("padded_rows"):
            msg += f", {pre['padded_rows']} short rows padded"
        if pre.get("side_malformed"):
            msg += f", {pre['side_malformed']} malformed side-file lines skipped"
    append_log(run_dir, msg)
    print(msg)
    print(f"run folder: {run_dir}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("preprocess", help="encode a raw dataset into the preprocessing cache",
                              description="Read a raw dataset, build the vocabularies and write the cache.")
    add_data_arguments(p)
    p.add_argument("--input", help="--dataset csv: the CSV, TSV or Parquet file the --spec describes (same as "
                                   "--data-dir)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    add_out_argument(p)
    p.set_defaults(func=cmd_preprocess)
