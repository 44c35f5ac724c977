"""Arguments and settings several subcommands share."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def begin_scoring(args: argparse.Namespace) -> None:
    """What `nbglm eval` and `nbglm build-de-cache` do first: refuse --train outside vcc2025, and
    let numba's OpenMP threads sleep between parallel kernels instead of spinning for milliseconds
    after each one, which took a core from the threads that sort the DE keys (2.65 -> 2.57 s for
    `nbglm eval` at 50 x 18,080 x 300). Not in the library: the setting is process-wide (torch's
    OpenMP reads it too); it must come before the first parallel kernel, and a value the user set
    wins."""
    from nbglm.errors import NbglmError

    if args.train and args.profile != "vcc2025":
        raise NbglmError(f"--train is the vcc2025 baseline's input; {args.profile} draws its baseline from --real")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


def add_profile(p: argparse.ArgumentParser) -> None:
    """`--profile`: the choices of `evaluate.profile` (the config's, equal to the registry's profiles;
    the registry itself would import the metrics just to parse)."""
    import typing

    from nbglm.config import EvaluateConfig

    choices = typing.get_args(typing.get_type_hints(EvaluateConfig)["profile"])
    p.add_argument("--profile", choices=choices, default=EvaluateConfig().profile,
                   help="metric profile: vcc2025 = cell-eval 0.8's DES/PDS/MAE; vcc2026 = cell-eval2 0.20's six "
                        "members on raw counts (default: %(default)s)")


def add_real_data(p: argparse.ArgumentParser) -> None:
    """What the metrics commands take of the real side: `--real`, `--profile`, `--pert-col`, `--control`."""
    p.add_argument("--real", required=True, type=Path, help="observed held-out cells (h5ad)")
    add_profile(p)
    add_data_labels(p)
