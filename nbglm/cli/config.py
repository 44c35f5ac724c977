"""`nbglm config`: print the resolved config, run nothing."""

from __future__ import annotations

import argparse

from nbglm.cli._args import add_config_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("config", help="print the resolved config as YAML (what a run would use)")
    add_config_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from nbglm.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
