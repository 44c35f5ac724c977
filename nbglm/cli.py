"""`nbglm` command line: one subcommand per job; every user-facing failure is one line, exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from nbglm.config import load_config, to_yaml
from nbglm.data.cli import add_split_parser, add_synth_parser
from nbglm.errors import NbglmError
from nbglm.metrics.cli import add_build_de_cache_parser, add_eval_parser
from nbglm.report import add_report_parser


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The `--config FILE --set k=v ...` pair every experiment command takes."""
    p.add_argument("--config", help="experiment YAML (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, value parsed as YAML (repeatable): --set model.rank=16")


def _cmd_config(args: argparse.Namespace) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from nbglm.pipeline import run_experiment, summary_line  # torch & co. load only for real work

    overrides = list(args.overrides) + ([f"pipeline.address={args.address}"] if args.address else [])
    cfg = load_config(args.config, overrides)
    if sys.stdout.isatty():
        from rich.logging import RichHandler

        logging.getLogger("nbglm").addHandler(RichHandler(show_path=False))
    result = run_experiment(cfg)
    print(summary_line(result))
    if result.failed_seeds:
        print(f"error: seeds {result.failed_seeds} failed; see {result.bundle}/metrics/multi_seed_metrics.json",
              file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbglm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config as YAML (what a run would use)")
    add_config_args(p)
    p.set_defaults(func=_cmd_config)
    p = sub.add_parser("run", help="run one experiment (train -> sample -> evaluate) and write its bundle")
    add_config_args(p)
    p.add_argument("--address", help="Ray address for pipeline.mode=multi_seed (default: start a local Ray)")
    p.set_defaults(func=_cmd_run)
    add_synth_parser(sub)
    add_split_parser(sub)
    add_eval_parser(sub)
    add_build_de_cache_parser(sub)
    add_report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NbglmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
