"""The ``optembed`` command line: a thin skin over the library (parse, call, print), one module per command.

Each module in :data:`SUBCOMMAND_MODULES` defines ``register(subparsers)``; :mod:`.methods` adds one subcommand
per registered method (:mod:`optembed_ext.search.base`) from its configuration dataclass. Every subcommand accepts
``--config file.yaml`` whose keys are the subcommand's long option names (``embed-dim: 16`` or ``embed_dim: 16``);
options given on the command line win over the file.

Launched by ``torchrun --nproc_per_node N -m optembed_ext <command> ...`` the command runs data-parallel: the
process group is started before the command and torn down after it (gloo on the CPU, NCCL for ``--device cuda``),
and only rank 0 prints. Rank 0 runs the command first: the other ranks start it when rank 0 reaches its first
collective (:func:`optembed_ext.train.distributed.hold_other_ranks`), so the run folder is set up once, and they
always continue (never empty) the run folder rank 0 prepared.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from .. import __version__
from ..train.config import load_yaml_config

SUBCOMMAND_MODULES = (
    "optembed_ext.cli.preprocess",
    "optembed_ext.cli.generate",
    "optembed_ext.cli.cache",
    "optembed_ext.cli.train",
    "optembed_ext.cli.search",
    "optembed_ext.cli.export",
    "optembed_ext.cli.methods",
    "optembed_ext.cli.compare",
)



def _subparsers_action(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("parser has no subcommands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optembed", description="Learned embedding-table compression for CTR "
                                                                  "models: preprocessing, training, search, export.")
    parser.add_argument("--version", action="version", version=f"optembed-ext {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        # every listed module is part of the package: an import error is a bug and propagates
        module = importlib.import_module(name)
        module.register(subparsers)
    for sub in subparsers.choices.values():
        if not any("--config" in a.option_strings for a in sub._actions):
            sub.add_argument("--config", help="YAML file of options (keys = long option names); the command "
                                              "line wins")
    return parser


def _option_dests(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name (without dashes, '-' and '_' both accepted) -> action."""
    out = {}
    for action in sub._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and not opt.startswith("--no-"):
                out[opt[2:]] = action
                out[opt[2:].replace("-", "_")] = action
    return out


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Set the chosen subcommand's defaults from its ``--config`` file, so the command line still wins."""
    subparsers = _subparsers_action(parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--config")
    pre.add_argument("--log-level")
    known, _ = pre.parse_known_args(argv)
    if not known.config or known.command not in subparsers.choices:
        return
    sub = subparsers.choices[known.command]
    try:
        values = load_yaml_config(known.config)
    except (OSError, ValueError) as err:
        sub.error(f"--config: {err}")
    actions = _option_dests(sub)
    defaults = {}
    for key, value in values.items():
        if key == "command":  # written into a run's config.yaml; must name this subcommand
            if value != known.command:
                sub.error(f"--config {known.config} is for '{value}', not '{known.command}'")
            continue
        action = actions.get(str(key))
        if action is None or key in ("config", "help"):
            sub.error(f"--config {known.config}: unknown option {key!r} for '{known.command}'")
        if isinstance(value, str) and callable(action.type):
            # YAML leaves e.g. "1e-3" or "64,32" as strings: convert them as the command line would
            try:
                value = action.type(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                sub.error(f"--config {known.config}: bad value {value!r} for {key!r}: {err}")
        defaults[action.dest] = value
        action.required = False
    sub.set_defaults(**defaults)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``optembed`` and ``python -m optembed_ext``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    args._argv = list(argv)  # the command line as given, for the run's log.txt
    if args.command is None:
        parser.print_help()
        return 2
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        parser.error(f"--log-level must be a logging level name, got {args.log_level!r}")
    from ..data.errors import DataError
    from ..train import distributed
    from ..train.checkpoint import RunFolderError

    started = distributed.init_from_env(getattr(args, "device", None))
    quiet = started and not distributed.is_main()  # torchrun: rank 0 prints and logs at the chosen level
    logging.basicConfig(level=max(level, logging.WARNING) if quiet else level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if started:
        if distributed.is_main():
            distributed.hold_other_ranks()
        else:
            if hasattr(args, "resume"):
                args.resume = True  # --no-resume empties the folder on rank 0 only
            distributed.wait_for_rank0()
    try:
        with open(os.devnull, "w") if quiet else contextlib.nullcontext() as sink:
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                return int(args.func(args) or 0)
    except (DataError, RunFolderError) as err:  # a user mistake: one line naming the file and what to do
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if started:
            distributed.release_other_ranks()  # a command without collectives (or one that failed early)
            distributed.destroy()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
