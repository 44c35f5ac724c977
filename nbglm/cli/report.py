"""`nbglm report SWEEP_DIR`: figures and one self-contained HTML page for a sweep."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="write SWEEP_DIR/report/: figures and a self-contained report.html",
                       description="Plot a sweep (metrics vs hyperparameters, best configs vs baselines, "
                                   "per-perturbation scores) and write one HTML page with the top configs.")
    p.add_argument("sweep_dir", type=Path, help="a sweep's directory, <storage_path>/<name>")
    p.add_argument("--top", type=int, default=10, help="configs in the table (default: %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    from nbglm.report import write_report

    print(write_report(args.sweep_dir, top=args.top))
    return 0
