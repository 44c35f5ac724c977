"""The in-memory dataset every later layer consumes (model, train, sample, metrics, sweep)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import anndata as ad
import numpy as np
import pandas as pd

from nbglm.data.rows import Rows
from nbglm.errors import NbglmError

PHASES = ("G1", "S", "G2M")  # cell-cycle phases, index 0/1/2; G1 is the model's reference


@dataclass
class GroupSums:
    """One AnnData's cells summed per (perturbation label, phase) group; cells with no counts are
    counted in `n_all` only (they have no size factor)."""

    labels: np.ndarray  # (groups,) perturbation label
    phase: np.ndarray  # (groups,) 0/1/2 = G1/S/G2M; -1 without a phase column or for another label
    n_all: np.ndarray  # (groups,) cells
    n: np.ndarray  # (groups,) cells with a positive total
    t1: np.ndarray  # (groups,) sum of cell totals
    t2: np.ndarray  # (groups,) sum of squared cell totals
    y: np.ndarray  # (groups, genes) float64 sums of counts
    control_rows: np.ndarray  # indices of the control groups, in the order of `moments`
    moments: np.ndarray  # (3, control groups, genes): sums of x^2, x / t and (x / t)^2 over control cells
    inv_t: np.ndarray  # (control groups,) sum of 1 / t over control cells
    median_total: float  # median total count over all cells, zero totals included
    bad_phases: tuple[str, ...]  # phase labels that are not G1/S/G2M (at most 5)

    @property
    def n_cells(self) -> int:
        return int(self.n_all.sum())


@dataclass
class Summaries:
    """What replaces a dataset's cells in concise mode (`Dataset.sums`)."""

    genes: list[str]
    train_perts: list[str]  # the training perturbations that have an embedding, in data order
    train: GroupSums
    test: GroupSums | None  # data.test's cells: the validation signal of a cross-validation unit
    control_totals: np.ndarray  # total counts of the real control cells that go with a prediction
    controls: ad.AnnData | None  # those cells, kept when predictions carry them (sampling.control_cells=real)


@dataclass
class Dataset:
    """Training counts, the held-out perturbations to predict, and the embeddings that link them.

    All matrices are raw UMI counts (float32 CSR, non-negative integers). `train` and `test`
    share `gene_names` in the same order; both contain the control cells.
    """

    train: ad.AnnData | None  # training cells: control + training perturbations; None when summarised
    test: ad.AnnData | None  # real held-out cells (+ control) for evaluation; None if unavailable
    heldout: pd.DataFrame  # columns target_gene, n_cells, median_umi_per_cell; one row per held-out pert
    gene_emb: np.ndarray  # (n_genes, d_g) float32, rows aligned to gene_names
    pert_emb: pd.DataFrame  # index: perturbation label (train and held-out), float32 columns
    pert_col: str  # obs column with the perturbation label
    control: str  # label of control cells in pert_col
    phase_col: str | None  # obs column with G1/S/G2M, if present in the data
    sums: Summaries | None = None  # concise mode: the cells' sums replace train's cells and test's counts
    train_x: Rows | None = None  # train's counts when train.X is None: a fold's part, or a file on disk
    test_x: Rows | None = None  # test's counts when test.X is None: a fold's validation part, or a file

    def train_counts(self) -> Rows:
        """The training counts, read a chunk of rows at a time."""
        return self.train_x if self.train_x is not None else Rows(self.train.X)

    def test_counts(self) -> Rows | None:
        """The test counts, read a chunk of rows at a time; None without test counts."""
        if self.test_x is not None:
            return self.test_x
        return None if self.test is None or self.test.X is None else Rows(self.test.X)

    def in_memory(self) -> Dataset:
        """This dataset with its counts in `train.X` and `test.X` (what a fit on cells needs)."""
        if self.train_x is None and self.test_x is None:
            return self
        train, test = (a if x is None else ad.AnnData(X=x.take(), obs=a.obs, var=a.var)
                       for a, x in ((self.train, self.train_x), (self.test, self.test_x)))
        return replace(self, train=train, train_x=None, test=test, test_x=None)

    @property
    def gene_names(self) -> list[str]:
        return list(self.sums.genes) if self.sums is not None else list(self.train.var_names)

    @property
    def n_train_cells(self) -> int:
        return self.sums.train.n_cells if self.sums is not None else self.train.n_obs

    @property
    def train_perts(self) -> list[str]:
        """Training perturbations that have an embedding (the ones the model is fit on)."""
        if self.sums is not None:
            return list(self.sums.train_perts)
        labels = self.train.obs[self.pert_col].astype(str)
        perts = pd.unique(labels[labels != self.control])
        return [p for p in perts if p in self.pert_emb.index]

    def _control_file(self) -> tuple[ad.AnnData, Rows]:
        """The file whose real control cells go with predictions: the test data if it has any, else
        training; its cells and their counts."""
        test = self.test_counts()
        if test is not None and self._is_control(self.test).any():
            return self.test, test
        return self.train, self.train_counts()

    def control_source(self) -> ad.AnnData:
        """`_control_file`'s cells with their counts in X."""
        cells, counts = self._control_file()
        return cells if cells.X is not None else ad.AnnData(X=counts.take(), obs=cells.obs, var=cells.var)

    def _control_counts(self) -> tuple[ad.AnnData, Rows]:
        """The real control cells that go with predictions: their obs and their counts."""
        cells, counts = self._control_file()
        keep = self._is_control(cells)
        return cells[keep], counts.subset(keep)

    def control_cells(self) -> ad.AnnData:
        """The real control cells that go with a prediction."""
        if self.sums is not None:
            if self.sums.controls is None:
                raise NbglmError("this dataset was summarised without its control cells: summarise it with "
                                 "keep_controls=True for sampling.control_cells=real")
            return self.sums.controls
        cells, counts = self._control_counts()
        return ad.AnnData(X=counts.take(), obs=cells.obs.copy(), var=cells.var.copy())

    def control_totals(self) -> np.ndarray:
        """Total counts of `control_cells()`: their number and depth size the predicted controls."""
        if self.sums is not None:
            return self.sums.control_totals
        return self._control_counts()[1].totals()

    def _is_control(self, adata: ad.AnnData) -> np.ndarray:
        return (adata.obs[self.pert_col].astype(str) == self.control).to_numpy()

    @property
    def heldout_perts(self) -> list[str]:
        return list(self.heldout["target_gene"])

