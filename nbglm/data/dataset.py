"""The in-memory dataset every later layer consumes (model, train, sample, metrics, sweep)."""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

PHASES = ("G1", "S", "G2M")  # cell-cycle phases, index 0/1/2; G1 is the model's reference


@dataclass
class Dataset:
    """Training counts, the held-out perturbations to predict, and the embeddings that link them.

    All matrices are raw UMI counts (float32 CSR, non-negative integers). `train` and `test`
    share `gene_names` in the same order; both contain the control cells.
    """

    train: ad.AnnData  # training cells: control + training perturbations
    test: ad.AnnData | None  # real held-out cells (+ control) for evaluation; None if unavailable
    heldout: pd.DataFrame  # columns target_gene, n_cells, median_umi_per_cell; one row per held-out pert
    gene_emb: np.ndarray  # (n_genes, d_g) float32, rows aligned to gene_names
    pert_emb: pd.DataFrame  # index: perturbation label (train and held-out), float32 columns
    pert_col: str  # obs column with the perturbation label
    control: str  # label of control cells in pert_col
    phase_col: str | None  # obs column with G1/S/G2M, if present in the data

    @property
    def gene_names(self) -> list[str]:
        return list(self.train.var_names)

    @property
    def train_perts(self) -> list[str]:
        """Training perturbations that have an embedding (the ones the model is fit on)."""
        labels = self.train.obs[self.pert_col].astype(str)
        perts = pd.unique(labels[labels != self.control])
        return [p for p in perts if p in self.pert_emb.index]

    @property
    def heldout_perts(self) -> list[str]:
        return list(self.heldout["target_gene"])


def pseudobulks(x: sp.spmatrix | np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct labels and the mean row of `x` per label, via one sparse indicator product."""
    names, codes = np.unique(labels, return_inverse=True)
    indicator = sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))), shape=(names.size, codes.size))
    sums = indicator @ x
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    return names, sums / np.bincount(codes)[:, None]
