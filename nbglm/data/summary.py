"""Cells reduced to per-group sums: everything a `concise` fit and its sampling need of them.

A concise fit sees the training cells only through sums per (perturbation, phase) group: the
counts Y, the cell totals (for S and Q, the sums of size factors and of their squares) and the
cell counts (see `nbglm.train`); the control cells' dispersion needs three more per-gene moments.
So a sweep unit in concise mode gets these sums instead of the cells (`summarized`): a few
megabytes per fold instead of the whole count matrix, and no per-unit copy of it.

Counts are read in row chunks (`nbglm.data.rows`), so no dense or float64 copy of the whole matrix is
made. Sums of counts and of totals are integers, exact in float64 whatever the order of addition.
"""

from __future__ import annotations

from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from nbglm.data.dataset import PHASES, Dataset, GroupSums, Summaries
from nbglm.data.rows import Rows, add_rows, row_chunks


def phase_codes(obs: pd.DataFrame, phase_col: str | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Each cell's phase 0/1/2 (G1/S/G2M), -1 without the column or for another label; and up to 5
    of those other labels."""
    if phase_col is None or phase_col not in obs.columns:
        return np.full(len(obs), -1, dtype=np.int64), ()
    labels = obs[phase_col].astype(str).to_numpy()
    codes = pd.Categorical(labels, categories=PHASES).codes.astype(np.int64)
    return codes, tuple(sorted(set(labels[codes < 0]))[:5])


def group_sums(counts: sp.spmatrix | np.ndarray | Rows, obs: pd.DataFrame, pert_col: str, control: str,
               phase_col: str | None) -> GroupSums:
    """Sum the cells' counts (rows of `counts`, described by `obs`) per (label, phase) group, a
    chunk of rows at a time."""
    labels = obs[pert_col].astype(str).to_numpy()
    phase, bad = phase_codes(obs, phase_col)
    names, label_codes = np.unique(labels, return_inverse=True)
    keys, group = np.unique(label_codes * (len(PHASES) + 1) + phase + 1, return_inverse=True)
    n_groups, n_genes = keys.size, counts.shape[1]
    group_labels = names[keys // (len(PHASES) + 1)]
    control_rows = np.flatnonzero(group_labels == control)
    slot = np.full(n_groups, -1)
    slot[control_rows] = np.arange(control_rows.size)

    totals = np.zeros(len(obs))
    y = np.zeros((n_groups, n_genes))
    moments = np.zeros((3, control_rows.size, n_genes))
    for start, x in row_chunks(counts):
        t = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
        totals[start:start + t.size] = t
        g = group[start:start + t.size]
        use = t > 0
        add_rows(x, np.where(use, g, -1), y)
        ctrl = use & (slot[g] >= 0)
        if ctrl.any():
            xc = x[np.flatnonzero(ctrl)]
            values = xc.data.astype(np.float64)
            scaled = values / np.repeat(t[ctrl], np.diff(xc.indptr))
            for k, v in enumerate((values * values, scaled, scaled * scaled)):
                add_rows(sp.csr_matrix((v, xc.indices, xc.indptr), shape=xc.shape), slot[g[ctrl]], moments[k])
    pos = totals > 0
    ctrl_cells = pos & (slot[group] >= 0)
    return GroupSums(
        labels=group_labels,
        phase=keys % (len(PHASES) + 1) - 1,
        n_all=np.bincount(group, minlength=n_groups),
        n=np.bincount(group, weights=pos, minlength=n_groups).astype(np.int64),
        t1=np.bincount(group, weights=totals, minlength=n_groups),
        t2=np.bincount(group, weights=totals**2, minlength=n_groups),
        y=y,
        control_rows=control_rows,
        moments=moments,
        inv_t=np.bincount(slot[group][ctrl_cells], weights=1.0 / totals[ctrl_cells], minlength=control_rows.size),
        median_total=float(np.median(totals)) if totals.size else 0.0,
        bad_phases=bad,
    )


def summarized(data: Dataset, keep_controls: bool) -> Dataset:
    """`data` with its cells replaced by their sums (`Dataset.sums`): `train` is None and `test`
    keeps its obs and genes (what a ground-truth cache checks) without counts. The real control
    cells that go with a prediction are kept with `keep_controls` (sampling.control_cells=real),
    else only their totals."""
    sums = Summaries(
        genes=data.gene_names,
        train_perts=data.train_perts,
        train=group_sums(data.train_counts(), data.train.obs, data.pert_col, data.control, data.phase_col),
        test=None if data.test is None else group_sums(data.test_counts(), data.test.obs, data.pert_col,
                                                       data.control, data.phase_col),
        control_totals=data.control_totals(),
        controls=data.control_cells() if keep_controls else None,
    )
    test = None if data.test is None else ad.AnnData(obs=data.test.obs[[data.pert_col]].copy(),
                                                     var=pd.DataFrame(index=data.test.var_names.copy()))
    return replace(data, train=None, train_x=None, test=test, test_x=None, sums=sums)
