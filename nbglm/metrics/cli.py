"""The ``nbglm eval`` and ``nbglm build-de-cache`` subcommands (wired in by nbglm.cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import anndata as ad
from rich.console import Console
from rich.table import Table

from nbglm.metrics.de_cache import atomic_write, build_de_cache, load_de_cache
from nbglm.metrics.evaluate import evaluate
from nbglm.metrics.io import read_counts_for_eval


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pert-col", default="target_gene", help="obs column with the perturbation labels (default: %(default)s)"
    )
    parser.add_argument("--control", default="non-targeting", help="label of the control cells (default: %(default)s)")


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval``: score a prediction against real data with the VCC metrics."""
    parser = subparsers.add_parser(
        "eval",
        help="score pred.h5ad against real.h5ad (DES, PDS, MAE, overall score)",
        description="Score a prediction with the Virtual Cell Challenge metrics, numerically as cell-eval 0.8 does.",
    )
    parser.add_argument("--pred", required=True, type=Path, help="predicted cells (h5ad), control cells included")
    parser.add_argument("--real", required=True, type=Path, help="observed held-out cells (h5ad)")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument(
        "--train", type=Path, help="training data (h5ad) for the cell-mean baseline of the overall score"
    )
    baseline.add_argument("--de-cache", type=Path, help="ground-truth cache directory from `nbglm build-de-cache`")
    _add_common(parser)
    parser.add_argument("--output", type=Path, help="write the metrics as JSON to this file")
    parser.set_defaults(func=run_eval)
    return parser


def add_build_de_cache_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``build-de-cache``: summarise the real data once for fast repeated evaluations."""
    parser = subparsers.add_parser(
        "build-de-cache",
        help="precompute the real data's pseudobulks, DE and baseline scores",
        description="Build the ground-truth cache that `nbglm eval --de-cache` reuses in every trial.",
    )
    parser.add_argument("--real", required=True, type=Path, help="observed held-out cells (h5ad)")
    parser.add_argument("--output", required=True, type=Path, help="cache directory to write")
    parser.add_argument("--train", type=Path, help="training data (h5ad): also score the cell-mean baseline")
    _add_common(parser)
    parser.set_defaults(func=run_build_de_cache)
    return parser


def _read(path: Path, what: str, pert_col: str) -> ad.AnnData:
    return read_counts_for_eval(path, pert_col, what)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, print a table, optionally write JSON; returns the exit code."""
    cache = load_de_cache(args.de_cache) if args.de_cache else None
    pred, real = _read(args.pred, "pred", args.pert_col), _read(args.real, "real", args.pert_col)
    train = _read(args.train, "train", args.pert_col) if args.train else None
    result = evaluate(pred, real, pert_col=args.pert_col, control=args.control, train=train, cache=cache)
    Console().print(_table(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.output, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    return 0


def run_build_de_cache(args: argparse.Namespace) -> int:
    """Build and save the ground-truth cache; returns the exit code."""
    real = _read(args.real, "real", args.pert_col)
    train = _read(args.train, "train", args.pert_col) if args.train else None
    cache = build_de_cache(real, train, pert_col=args.pert_col, control=args.control)
    cache.save(args.output)
    if cache.baseline is None:
        baseline = "no baseline (no --train)"
    else:
        baseline = ", ".join(f"{name} {value:.4f}" for name, value in cache.baseline.items())
    shape = f"{cache.real.perts.size} perturbations x {cache.real.genes.size} genes"
    print(f"wrote {args.output}: {shape}; baseline: {baseline}")
    return 0


def _table(result: dict[str, Any]) -> Table:
    table = Table(title=f"VCC metrics ({result['n_perturbations']} perturbations, {result['n_genes']} genes)")
    for column in ("metric", "value", "baseline", "scaled"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    baseline, scaled = result["baseline"] or {}, result["scaled"] or {}
    for name, label in (("des", "DES (best 1)"), ("pds", "PDS (best 1)"), ("mae", "MAE (best 0)")):
        table.add_row(label, f"{result[name]:.4f}", _fmt(baseline.get(name)), _fmt(scaled.get(name)))
    overall = result["overall_score"]
    shown = "n/a (no baseline)" if overall is None else f"{overall:.4f} (x100 = {100 * overall:.2f})"
    table.add_row("overall score", "", "", shown)
    return table


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
