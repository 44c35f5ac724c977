"""What the metrics read of a file of cells: its counts, each cell's perturbation label and the
gene names. An AnnData serves; so does `Cells`, which `nbglm eval` reads from an h5ad file without
importing anndata and pandas (about half a second of a command's start-up, more than the reading)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from nbglm.errors import NbglmError

if TYPE_CHECKING:
    import anndata as ad


@dataclass(eq=False)
class Cells:
    """Counts `X` (cells x genes, or None when only the labels were read), the labels in obs column
    `pert_col` (str, one per cell) and the gene names (str)."""

    X: Any
    pert_col: str
    labels: np.ndarray
    genes: np.ndarray

    def to_anndata(self) -> ad.AnnData:
        """The same cells as an AnnData (cells named by position), for code that needs one."""
        import anndata as ad
        import pandas as pd

        obs = pd.DataFrame({self.pert_col: self.labels}, index=pd.RangeIndex(self.labels.size).astype(str))
        return ad.AnnData(X=self.X, obs=obs, var=pd.DataFrame(index=pd.Index(self.genes, dtype=str)))


CellsLike = Any  # an AnnData or `Cells`; named for the signatures that take either


def labels_of(cells: CellsLike, pert_col: str, which: str) -> np.ndarray:
    """Each cell's label in obs column `pert_col`, as str; a one-line error naming `which` file when
    it has no such column."""
    if isinstance(cells, Cells):
        columns, labels = [cells.pert_col], cells.labels if pert_col == cells.pert_col else None
    else:
        columns = list(cells.obs.columns)
        labels = _column_str(cells.obs[pert_col]) if pert_col in columns else None
    if labels is None:
        raise NbglmError(f"{which} has no obs column {pert_col!r} (columns: {', '.join(map(str, columns))}); "
                         "set the perturbation column")
    return labels


def _column_str(column: Any) -> np.ndarray:
    """A pandas column as str: a categorical one (as anndata reads strings) by its codes into its
    categories, a fifth of converting every value (0.1 against 0.5 ms for 4,800 cells); missing
    values become "nan" either way."""
    if column.dtype.name == "category":
        codes = column.cat.codes.to_numpy()
        if codes.size and codes.min() >= 0:
            return column.cat.categories.to_numpy(str)[codes]
    return column.to_numpy(str)


def genes_of(cells: CellsLike) -> np.ndarray:
    """The gene names, as str."""
    return cells.genes if isinstance(cells, Cells) else cells.var_names.to_numpy(str)


def as_anndata(cells: CellsLike, x: Any = None) -> ad.AnnData:
    """`cells` as an AnnData, with counts `x` instead of its own when given."""
    adata = cells.to_anndata() if isinstance(cells, Cells) else cells
    if x is None:
        return adata
    import anndata as ad

    return ad.AnnData(X=x, obs=adata.obs, var=adata.var)
