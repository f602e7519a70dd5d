"""``optembed cache list | clean``: what the preprocessing cache holds, and removing stale or corrupt entries."""
from __future__ import annotations

import argparse
import json


def _size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _line(e) -> str:
    rows = e.rows if e.rows is not None else "-"
    text = f"{e.status:9} {e.dataset or '?':14} {rows:>10} rows {_size(e.size_bytes):>10}  {e.path}"
    return text + (f"  ({e.reason})" if e.reason else "")


def cmd_list(args: argparse.Namespace) -> int:
    from ..data.cache import list_caches

    root = args.cache_dir
    entries = list_caches(root, full=True if args.full else None)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=1, default=str))
        return 0
    if not entries:
        print(f"no cache folders under {root}")
    for e in entries:
        print(_line(e))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from ..data.cache import clean_caches

    root = args.cache_dir
    statuses = "all" if args.all else (args.status or ("stale", "corrupt", "orphaned"))
    removed = clean_caches(root, statuses=statuses, datasets=args.dataset, dry_run=args.dry_run)
    total = sum(int(e.size_bytes or 0) for e in removed)
    print(f"{'would remove' if args.dry_run else 'removed'} {len(removed)} cache folders ({_size(total)}) "
          f"under {root}")
    for e in removed:
        print(_line(e))
    return 0


def register(subparsers) -> None:
    c = subparsers.add_parser("cache", help="list or clean the preprocessing cache",
                              description="List the preprocessing cache folders with their status (valid, stale, "
                                          "corrupt, building, orphaned) or remove some of them.")
    sub = c.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="one line per cache folder: status, dataset, rows, size, path")
    ls.add_argument("--cache-dir", required=True, help="the cache folder (--cache-dir of preprocess / train)")
    ls.add_argument("--full", action="store_true", help="verify every block of every array (slow on big caches)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of lines")
    ls.set_defaults(func=cmd_list)
    cl = sub.add_parser("clean", help="remove stale, corrupt and orphaned cache folders (or --all)")
    cl.add_argument("--cache-dir", required=True, help="the cache folder (--cache-dir of preprocess / train)")
    cl.add_argument("--all", action="store_true", help="remove every cache folder that is not in use")
    cl.add_argument("--status", nargs="+", choices=("valid", "stale", "corrupt", "orphaned"),
                    help="remove the folders of these statuses (default: stale corrupt orphaned)")
    cl.add_argument("--dataset", nargs="+", help="only the folders of these datasets")
    cl.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    cl.set_defaults(func=cmd_clean)
