"""`nbglm synth` and `nbglm split`: write datasets as files, all-or-nothing."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np

from nbglm.config import DataConfig, load_config
from nbglm.data.io import pert_labels, read_counts
from nbglm.data.split import split_by_perturbation
from nbglm.data.synthetic import FILES, make_synthetic, write_synthetic
from nbglm.errors import NbglmError


def summarize(adata: ad.AnnData, pert_col: str, control: str) -> str:
    """One line: size, perturbations, controls, depth and sparsity."""
    n_cells, n_genes = adata.shape
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    nnz = adata.X.nnz if hasattr(adata.X, "nnz") else int(np.count_nonzero(adata.X))
    n_ctrl = int((adata.obs[pert_col].astype(str) == control).sum())
    zeros = 100.0 * (1.0 - nnz / max(1, n_cells * n_genes))
    return (f"{n_cells} cells x {n_genes} genes, {len(pert_labels(adata, pert_col, control))} perturbations "
            f"+ {n_ctrl} control cells, median {np.median(totals):.0f} UMI/cell, {zeros:.1f}% zeros")


def check_output(out: str | Path) -> Path:
    """Refuse an existing non-empty `out` rather than merging into or overwriting it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NbglmError(f"output {out} already exists and is not an empty directory; choose a new one or remove it")
    return out


def write_dir(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a temp dir beside `out`, then rename it to `out`: nothing half-written."""
    out = check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _cmd_synth(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_output(args.output)
    pert_col, control = cfg.data.pert_name_col, cfg.data.control_name
    data = make_synthetic(cfg.data.synthetic, pert_col, control)
    out = write_dir(args.output, lambda tmp: write_synthetic(data, tmp))
    print(f"wrote {out}/: {', '.join(FILES)}")
    print(f"train: {summarize(data.train, pert_col, control)}")
    print(f"test:  {summarize(data.test, pert_col, control)}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    check_output(args.output)
    adata = read_counts(args.input, args.pert_col, args.control, "input")
    test_perts = [p.strip() for p in args.test_perts.split(",") if p.strip()] if args.test_perts else None
    train, test, val = split_by_perturbation(adata, args.pert_col, args.control, args.test_fraction,
                                             args.seed, test_perts)

    def write(tmp: Path) -> None:
        train.write_h5ad(tmp / "train.h5ad")
        test.write_h5ad(tmp / "test.h5ad")
        val.to_csv(tmp / "val_list.csv", index=False)

    out = write_dir(args.output, write)
    print(f"wrote {out}/: train.h5ad, test.h5ad, val_list.csv")
    print(f"train: {summarize(train, args.pert_col, args.control)}")
    print(f"test:  {summarize(test, args.pert_col, args.control)}")
    print(f"held out: {', '.join(val['target_gene'])}")
    return 0


def add_synth_parser(subparsers: argparse._SubParsersAction) -> None:
    from nbglm.cli import add_config_args  # the CLI module imports this one; defer to avoid a cycle

    p = subparsers.add_parser("synth", help="write the built-in synthetic dataset as files (h5ad, CSV)")
    p.add_argument("--output", required=True, help="new or empty directory to write into")
    add_config_args(p)
    p.set_defaults(func=_cmd_synth)


def add_split_parser(subparsers: argparse._SubParsersAction) -> None:
    defaults = DataConfig()
    p = subparsers.add_parser("split", help="split an h5ad by perturbation into train/test + val list")
    p.add_argument("--input", required=True, help="h5ad of raw counts to split")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--test-fraction", type=float, help="fraction of perturbations to hold out")
    how.add_argument("--test-perts", help="comma-separated perturbations to hold out, e.g. A,B,C")
    p.add_argument("--seed", type=int, default=0, help="seed for --test-fraction (default 0)")
    p.add_argument("--output", required=True, help="new or empty directory to write into")
    p.add_argument("--pert-col", default=defaults.pert_name_col,
                   help=f"obs column with the perturbation label (default {defaults.pert_name_col})")
    p.add_argument("--control", default=defaults.control_name,
                   help=f"label of control cells (default {defaults.control_name})")
    p.set_defaults(func=_cmd_split)
