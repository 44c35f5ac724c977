"""`nbglm build-de-cache`: the real data's side of the VCC metrics, computed once for many evaluations."""

from __future__ import annotations

import argparse
from pathlib import Path

from nbglm.cli._args import add_real_data, begin_scoring

LEAVE_AT_ONCE = True  # its work ends in files and printed output: see `nbglm.cli.process`


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("build-de-cache", help="precompute the real data's side of the metrics (DE, baseline, ...)",
                       description="Build the ground-truth cache that `nbglm eval --de-cache` reuses in every trial: "
                                   "vcc2025: pseudobulks, DE and the cell-mean baseline's scores; vcc2026: profiles, "
                                   "DE, control cells, the baseline's and the replicate anchor's panel means.")
    add_real_data(p)
    p.add_argument("--output", required=True, type=Path, help="cache directory to write")
    p.add_argument("--train", type=Path, help="training data (h5ad): also score the cell-mean baseline (vcc2025)")
    return p


def run(args: argparse.Namespace) -> int:
    begin_scoring(args)
    from nbglm import atomic
    from nbglm.metrics import GroundTruthCache, build_cache, read_counts_for_eval

    atomic.check_new_output(args.output)
    real = read_counts_for_eval(args.real, args.pert_col, "real")
    train = read_counts_for_eval(args.train, args.pert_col, "train") if args.train else None
    cache = build_cache(real, train, profile=args.profile, pert_col=args.pert_col, control=args.control)
    with atomic.atomic_dir(args.output) as tmp:
        cache.save(tmp)
    if not isinstance(cache, GroundTruthCache):
        ends = ", ".join(f"{name} {cache.baseline[name]:.4f}..{cache.replicate[name]:.4f}" for name in cache.baseline)
        print(f"wrote {args.output}: {cache.real.labels.size} perturbations x {cache.genes.size} genes; "
              f"baseline..replicate: {ends}")
        return 0
    if cache.baseline is None:
        baseline = "no baseline (no --train)"
    else:
        baseline = ", ".join(f"{name} {value:.4f}" for name, value in cache.baseline.items())
    shape = f"{cache.real.perts.size} perturbations x {cache.real.genes.size} genes"
    print(f"wrote {args.output}: {shape}; baseline: {baseline}")
    return 0
