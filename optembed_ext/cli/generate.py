"""``optembed generate``: write a raw Criteo or Avazu file of the real data's shape (see :mod:`optembed_ext.data.generate`)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..data.generate import generate_raw

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise SystemExit(f"error: --out {out} is a folder; pass the file to write")
    start = time.perf_counter()
    with tqdm(total=args.rows, unit="rows", unit_scale=True, desc=f"{args.format}: generating",
              disable=not args.progress, leave=False) as bar:
        info = generate_raw(args.format, args.rows, out, seed=args.seed, chunk_rows=args.chunk_rows,
                            on_progress=bar.update)
    seconds = time.perf_counter() - start
    side = out.with_name(out.name + ".planted.json")
    side.write_text(json.dumps({**info, "seed": args.seed, "seconds": seconds}, indent=1))
    print(f"{args.format}: wrote {info['rows']} rows, {info['bytes'] / 1e9:.2f} GB to {out} in {seconds:.1f}s "
          f"({info['rows'] / max(seconds, 1e-9):,.0f} rows/s); planted label model: {side}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="write a raw Criteo/Avazu file of the real data's shape",
                              description="Write a raw click log in the original Criteo (TSV) or Avazu (CSV) "
                                          "format, with the real per-field vocabulary sizes, heavy-tailed "
                                          "frequencies and a planted label model (FILE.planted.json).")
    p.add_argument("--format", required=True, choices=("criteo", "avazu"), help="raw format to write")
    p.add_argument("--rows", required=True, type=int, help="number of data rows")
    p.add_argument("--out", required=True, help="file to write (large: put it under /tmp)")
    p.add_argument("--seed", type=int, default=0, help="seed (same seed and chunk size: same bytes)")
    p.add_argument("--chunk-rows", type=int, default=250_000, help="rows generated per chunk (memory bound)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.set_defaults(func=cmd_generate)
