"""`nbglm build-de-cache`: the real data's side of the VCC metrics, computed once for many evaluations."""

from __future__ import annotations

import argparse
from pathlib import Path

from nbglm.cli._args import add_data_labels


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("build-de-cache", help="precompute the real data's pseudobulks, DE and baseline scores",
                       description="Build the ground-truth cache that `nbglm eval --de-cache` reuses in every trial.")
    p.add_argument("--real", required=True, type=Path, help="observed held-out cells (h5ad)")
    p.add_argument("--output", required=True, type=Path, help="cache directory to write")
    p.add_argument("--train", type=Path, help="training data (h5ad): also score the cell-mean baseline")
    add_data_labels(p)
    return p


def run(args: argparse.Namespace) -> int:
    from nbglm import atomic
    from nbglm.metrics import build_de_cache, read_counts_for_eval

    atomic.check_new_output(args.output)
    real = read_counts_for_eval(args.real, args.pert_col, "real")
    train = read_counts_for_eval(args.train, args.pert_col, "train") if args.train else None
    cache = build_de_cache(real, train, pert_col=args.pert_col, control=args.control)
    with atomic.atomic_dir(args.output) as tmp:
        cache.save(tmp)
    if cache.baseline is None:
        baseline = "no baseline (no --train)"
    else:
        baseline = ", ".join(f"{name} {value:.4f}" for name, value in cache.baseline.items())
    shape = f"{cache.real.perts.size} perturbations x {cache.real.genes.size} genes"
    print(f"wrote {args.output}: {shape}; baseline: {baseline}")
    return 0
