"""Reading and validating Perturb-seq counts and held-out lists (every problem is one NbglmError
line), and writing an h5ad whose matrix arrives in row blocks."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem

from nbglm.data.rows import OnDisk, Rows
from nbglm.errors import NbglmError

VAL_COLUMNS = ("target_gene", "n_cells", "median_umi_per_cell")
_H5_CHUNK = 1 << 18  # values per HDF5 chunk of a matrix written in row blocks (1 MiB of float32)


def _examples(items, n: int = 5) -> str:
    items = [str(i) for i in items]
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def read_counts(path: str | Path, pert_col: str, control: str | None, what: str = "data") -> ad.AnnData:
    """Read an h5ad of raw UMI counts and check it; return float32 CSR counts.

    The obs/var tables are checked first; the matrix is then read from disk in row chunks
    (`nbglm.data.rows`), each checked and converted into the float32 CSR arrays, so reading never
    holds a second copy of the whole matrix in another dtype. Counts must be non-negative integers
    (dense or sparse, any dtype): the NB model is defined on raw UMIs, and normalised or log data
    would silently give wrong fits. `control=None` skips the control-label check (e.g. a test file
    may hold no controls).
    """
    p, backed = _open_backed(path, what)
    try:
        return validate_counts(backed, pert_col, control, str(p))
    finally:
        backed.file.close()


def _open_backed(path: str | Path, what: str) -> tuple[Path, ad.AnnData]:
    """The h5ad opened backed (obs/var in memory, X on disk), or one error line."""
    p = Path(path)
    if not p.is_file():
        raise NbglmError(f"{what} file not found: {p} (check the path)")
    try:
        with warnings.catch_warnings():  # duplicated names are checked later, as one error line
            warnings.filterwarnings("ignore", message=".*names are not unique", category=UserWarning)
            return p, ad.read_h5ad(p, backed="r")
    except Exception as exc:
        raise NbglmError(f"cannot read {p} as h5ad: {exc}".splitlines()[0]) from None


def open_counts(path: str | Path, pert_col: str, control: str | None, what: str = "data") -> tuple[ad.AnnData, Rows]:
    """`read_counts` that leaves the matrix on disk: the cells' obs/var (X None) and their counts as
    `Rows` read from the file a chunk at a time, every value checked now by one pass. Files whose X
    is not stored by rows (CSC) are read into memory."""
    p, backed = _open_backed(path, what)
    try:
        if not OnDisk.readable(p):
            cells = validate_counts(backed, pert_col, control, str(p))
            return ad.AnnData(obs=cells.obs, var=cells.var), Rows(cells.X)
        cells = _checked_cells(backed, pert_col, control, str(p))
    finally:
        backed.file.close()
    counts = Rows(OnDisk(p))
    totals = np.zeros(counts.shape[0])
    for pos, block in counts.chunks(check=lambda values: check_values(values, str(p))):
        totals[pos:pos + block.shape[0]] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
    return cells, Rows(counts.x, counts_totals=totals)


def check_tables(adata: ad.AnnData, pert_col: str, control: str | None, source: str) -> pd.Series:
    """Check the perturbation column, control label, shape and gene names; return the labels."""
    if pert_col not in adata.obs.columns:
        raise NbglmError(f"{source} has no obs column '{pert_col}' (available: {_examples(adata.obs.columns, 8)}); "
                         "set the column with data.pert_name_col (nbglm split: --pert-col)")
    labels = adata.obs[pert_col].astype(str)
    if control is not None and not (labels == control).any():
        raise NbglmError(f"{source}: control label '{control}' not found in obs['{pert_col}'] (labels present "
                         f"include: {_examples(pd.unique(labels))}); set the label with data.control_name "
                         "(nbglm split: --control)")
    if adata.X is None:
        raise NbglmError(f"{source} has no X matrix; X must hold raw UMI counts")
    if adata.n_vars == 0 or adata.n_obs == 0:
        raise NbglmError(f"{source} has {adata.n_obs} cells x {adata.n_vars} genes; X must hold raw UMI counts of "
                         "cells (rows) x genes (columns)")
    dup = adata.var_names[adata.var_names.duplicated()]
    if len(dup):
        raise NbglmError(f"{source}: {len(pd.unique(dup))} gene name(s) appear more than once in var_names "
                         f"(e.g. {_examples(pd.unique(dup), 3)}); make them unique (adata.var_names_make_unique())")
    return labels


def check_values(values: np.ndarray, source: str) -> None:
    """Raw UMI counts: a real numeric dtype, finite, non-negative, integral."""
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise NbglmError(f"{source}: X has dtype {values.dtype}; X must hold raw UMI counts")
    if not values.size:
        return
    if not np.isfinite(values).all():
        raise NbglmError(f"{source}: X has NaN/inf values; X must hold raw UMI counts")
    if values.min() < 0:
        raise NbglmError(f"{source}: X has negative values (min {values.min():g}); X must hold raw UMI "
                         "counts (if they are in a layer or .raw, copy them to X)")
    frac = values != np.round(values)
    if frac.any():
        raise NbglmError(f"{source}: X has non-integer values (e.g. {values[frac][0]:g}); X must hold raw "
                         "UMI counts, not normalised or log data (if counts are in a layer, copy them to X)")


def _read_matrix(x, source: str) -> sp.csr_matrix:
    """The float32 CSR of an h5ad's X (in memory or on disk; dense, CSR or CSC), checked chunk by
    chunk and written into arrays allocated once at their final size."""
    if getattr(x, "format", None) == "csc" or (sp.issparse(x) and x.format != "csr"):
        x = sp.csr_matrix(x.to_memory() if hasattr(x, "to_memory") else x)  # rows of a CSC file are not contiguous
    return Rows(x).take(check=lambda values: check_values(values, source))


def validate_counts(adata: ad.AnnData, pert_col: str, control: str | None, source: str) -> ad.AnnData:
    """`read_counts`' checks and conversion for an AnnData already in memory."""
    cells = _checked_cells(adata, pert_col, control, source)
    cells.X = _read_matrix(adata.X, source)
    return cells


def _checked_cells(adata: ad.AnnData, pert_col: str, control: str | None, source: str) -> ad.AnnData:
    """`adata`'s obs and var, checked (`check_tables`), labels categorical; no X yet."""
    labels = check_tables(adata, pert_col, control, source)
    obs = adata.obs.copy()
    obs[pert_col] = pd.Categorical(labels.to_numpy())
    return ad.AnnData(obs=obs, var=adata.var.copy())


def pert_labels(adata: ad.AnnData, pert_col: str, control: str) -> list[str]:
    """Non-control perturbation labels in order of first appearance."""
    labels = adata.obs[pert_col].astype(str)
    return list(pd.unique(labels[labels != control]))


def val_list(adata: ad.AnnData, pert_col: str, control: str, totals: np.ndarray | None = None) -> pd.DataFrame:
    """Held-out list (target_gene, n_cells, median_umi_per_cell) computed from real cells (`totals`:
    their total counts, when their X is not in memory)."""
    labels = adata.obs[pert_col].astype(str).to_numpy()
    totals = np.asarray(adata.X.sum(axis=1)).ravel() if totals is None else totals
    frame = pd.DataFrame({"target_gene": labels, "umi": totals})
    frame = frame[frame["target_gene"] != control]
    grouped = frame.groupby("target_gene", sort=False)["umi"]
    return pd.DataFrame({
        "target_gene": list(grouped.groups),
        "n_cells": grouped.size().to_numpy().astype(int),
        "median_umi_per_cell": grouped.median().to_numpy().astype(float),
    })


def read_val_list(path: str | Path) -> pd.DataFrame:
    """Read the held-out list CSV (target_gene, n_cells, median_umi_per_cell); values checked here,
    names checked against the data/embeddings by the caller."""
    p = Path(path)
    if not p.is_file():
        raise NbglmError(f"validation list not found: {p} (check paths.val_list_csv)")
    try:
        frame = pd.read_csv(p, dtype={"target_gene": str})
    except Exception as exc:
        raise NbglmError(f"cannot read validation list {p} as CSV: {exc}".splitlines()[0]) from None
    missing = [c for c in VAL_COLUMNS if c not in frame.columns]
    if missing:
        raise NbglmError(f"validation list {p} lacks column(s) {', '.join(missing)} (has: "
                         f"{_examples(frame.columns, 8)}); expected {', '.join(VAL_COLUMNS)}")
    frame = frame[list(VAL_COLUMNS)]
    if frame.empty:
        raise NbglmError(f"validation list {p} has no rows; list at least one held-out perturbation")
    if frame["target_gene"].isna().any():
        raise NbglmError(f"validation list {p} has empty target_gene entries")
    for col in VAL_COLUMNS[1:]:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = frame["target_gene"][~(values > 0)]
        if len(bad):
            raise NbglmError(f"validation list {p}: {col} must be a positive number, but is not for "
                             f"{_examples(bad)}")
        frame[col] = values
    if (frame["n_cells"] != np.round(frame["n_cells"])).any():
        raise NbglmError(f"validation list {p}: n_cells must be whole numbers")
    dup = frame["target_gene"][frame["target_gene"].duplicated()]
    if len(dup):
        raise NbglmError(f"validation list {p} lists {_examples(pd.unique(dup))} more than once")
    frame["n_cells"] = frame["n_cells"].astype(int)
    frame["median_umi_per_cell"] = frame["median_umi_per_cell"].astype(float)
    return frame.reset_index(drop=True)


def check_val_perts(val: pd.DataFrame, known: list[str], source: str, where: str) -> None:
    """Every held-out perturbation must be known to `where` (the test data or the embeddings)."""
    known_set = set(known)
    unknown = [p for p in val["target_gene"] if p not in known_set]
    if unknown:
        raise NbglmError(f"validation list {source} names perturbation(s) not in {where}: {_examples(unknown)}; "
                         "fix the list or the perturbation labels")



def describe(adata: ad.AnnData, pert_col: str, control: str) -> str:
    """One line: size, perturbations, controls, depth and sparsity."""
    n_cells, n_genes = adata.shape
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    nnz = adata.X.nnz if hasattr(adata.X, "nnz") else int(np.count_nonzero(adata.X))
    n_ctrl = int((adata.obs[pert_col].astype(str) == control).sum())
    zeros = 100.0 * (1.0 - nnz / max(1, n_cells * n_genes))
    return (f"{n_cells} cells x {n_genes} genes, {len(pert_labels(adata, pert_col, control))} perturbations "
            f"+ {n_ctrl} control cells, median {np.median(totals):.0f} UMI/cell, {zeros:.1f}% zeros")


def write_h5ad_rows(path: str | Path, obs: pd.DataFrame, var: pd.DataFrame,
                    blocks: Iterable[sp.csr_matrix]) -> np.ndarray:
    """Write an h5ad file whose X (CSR, float32) arrives as row blocks, appended one at a time, so
    that a matrix larger than memory never exists whole; returns each row's total (float64).
    The blocks' rows must add up to `obs`'s."""
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    totals = []
    with h5py.File(path, "a") as f:
        x = None
        for block in blocks:
            block = sp.csr_matrix(block, dtype=np.float32)
            totals.append(np.asarray(block.sum(axis=1, dtype=np.float64)).ravel())
            if x is None:
                write_elem(f, "X", block, dataset_kwargs={"chunks": (_H5_CHUNK,)})
                x = sparse_dataset(f["X"])
            else:
                x.append(block)
    out = np.concatenate(totals) if totals else np.zeros(0)
    if out.size != len(obs):
        raise ValueError(f"write_h5ad_rows: {out.size} rows written for {len(obs)} cells")
    return out
