"""Arguments several subcommands share."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The `--config FILE --set k=v ...` pair every experiment command takes."""
    p.add_argument("--config", help="experiment YAML (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, value parsed as YAML (repeatable): --set model.rank=16")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_connect_timeout(p: argparse.ArgumentParser) -> None:
    """`--connect-timeout`: the deadline of an attempt to attach to the Ray at --address (the default
    is nbglm.sweep.cluster.CONNECT_TIMEOUT_S, not imported: parsing imports no Ray)."""
    p.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="give up attaching to --address after this many seconds (default: %(default)s)")


def add_data_labels(p: argparse.ArgumentParser) -> None:
    """`--pert-col` and `--control`, defaulting to the experiment config's."""
    from nbglm.config import DataConfig

    defaults = DataConfig()
    p.add_argument("--pert-col", default=defaults.pert_name_col,
                   help="obs column with the perturbation label (default: %(default)s)")
    p.add_argument("--control", default=defaults.control_name,
                   help="label of the control cells (default: %(default)s)")
