"""``optembed export --run RUN [--out FILE]``: a finished OptEmbed run as a physically compact model."""
from __future__ import annotations

import argparse


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``optembed export`` (see :func:`cmd_export`)."""
    parser.add_argument("--run", required=True, help="run folder of a finished `optembed search`")
    parser.add_argument("--out", default=None, help="output file (default <run>/compact_model.pt)")
    parser.add_argument("--batch-size", type=int, default=4096, help="batch size of the latency measurement")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions of the latency measurement")
    parser.add_argument("--no-benchmark", dest="benchmark", action="store_false",
                        help="skip the latency comparison")
    parser.add_argument("--device", default="cpu", help="device of the latency measurement")


def cmd_export(args: argparse.Namespace) -> int:
    """``optembed export --run runs/x --out model.pt``: writes the model and ``<out>.json`` (memory, latency)."""
    from ..export import export_run

    try:
        export_run(args.run, getattr(args, "out", None), batch_size=int(getattr(args, "batch_size", 4096)),
                   repeats=int(getattr(args, "repeats", 20)), benchmark=bool(getattr(args, "benchmark", True)),
                   device=getattr(args, "device", "cpu"), log=print)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    return 0


def register(subparsers) -> None:
    e = subparsers.add_parser("export", help="export a finished OptEmbed run as a physically compact model")
    e.add_argument("--config", default=None, help="unused (accepted for uniformity)")
    add_export_arguments(e)
    e.set_defaults(func=cmd_export)
