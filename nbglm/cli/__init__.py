"""`nbglm` command line: one module per subcommand, each an `add_parser` / `run` pair.

Parsing imports nothing heavy (no torch, Ray, anndata, numpy...): every subcommand imports what it
needs inside `run`, so `nbglm --help` answers at once. A known bad input is one line on stderr and
exit 2 (a full disk too); any other failure is one line naming the exception and exit 1 (`--debug`
shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import typing

from nbglm.cli import build_de_cache, config, eval, report, run, split, sweep, synth
from nbglm.atomic import disk_full, disk_full_error
from nbglm.errors import NbglmError

COMMANDS = (run, config, sweep, report, eval, build_de_cache, synth, split)


class _Parser(argparse.ArgumentParser):
    """argparse with a bad argument as one line too (argparse prints the usage before it)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nbglm", description="Low-rank NB-GLM for unseen genetic "
                                     "perturbations: experiments, sweeps on Ray, VCC metrics.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = command.add_parser(sub)
        p.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
        p.set_defaults(run=command.run)
    return parser


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except NbglmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if disk_full(exc):  # a full disk outside nbglm.atomic (Ray, TensorBoard...): one line too
            print(f"error: {disk_full_error(exc.filename)}", file=sys.stderr)
            return 2
        print(f"error: {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
