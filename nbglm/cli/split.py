"""`nbglm split`: split an h5ad by perturbation into train/test files and a held-out list."""

from __future__ import annotations

import argparse

from nbglm.cli._args import add_data_labels


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("split", help="split an h5ad by perturbation into train/test + val list")
    p.add_argument("--input", required=True, help="h5ad of raw counts to split")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--test-fraction", type=float, help="fraction of perturbations to hold out")
    how.add_argument("--test-perts", help="comma-separated perturbations to hold out, e.g. A,B,C")
    p.add_argument("--seed", type=int, default=0, help="seed for --test-fraction (default 0)")
    p.add_argument("--output", required=True, help="new or empty directory to write into")
    add_data_labels(p)
    return p


def run(args: argparse.Namespace) -> int:
    from nbglm import atomic
    from nbglm.data.io import describe, read_counts
    from nbglm.data.split import split_by_perturbation

    atomic.check_new_output(args.output)
    adata = read_counts(args.input, args.pert_col, args.control, "input")
    test_perts = [p.strip() for p in args.test_perts.split(",") if p.strip()] if args.test_perts else None
    train, test, val = split_by_perturbation(adata, args.pert_col, args.control, args.test_fraction,
                                             args.seed, test_perts)
    with atomic.atomic_dir(args.output) as tmp:
        train.write_h5ad(tmp / "train.h5ad")
        test.write_h5ad(tmp / "test.h5ad")
        val.to_csv(tmp / "val_list.csv", index=False)
    print(f"wrote {args.output}/: train.h5ad, test.h5ad, val_list.csv")
    print(f"train: {describe(train, args.pert_col, args.control)}")
    print(f"test:  {describe(test, args.pert_col, args.control)}")
    print(f"held out: {', '.join(val['target_gene'])}")
    return 0
