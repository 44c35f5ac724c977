"""Read an h5ad file for evaluation: only what the metrics use.

Why not ``anndata.read_h5ad``: it reads every obs and var column, obsm, layers and uns, which the
metrics never look at; at command level reading the files is most of the time left. This reads
X (sparse as stored, in its stored dtype), the perturbation column and the gene names; the cells
are named by their position.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from anndata.io import read_elem

from nbglm.errors import NbglmError


def read_counts_for_eval(path: Path | str, pert_col: str, what: str) -> ad.AnnData:
    """X, ``obs[pert_col]`` and var_names of the h5ad file at `path` (`what` names it in errors:
    "pred", "real", "train"). Files without anndata's dataframe encoding (written by anndata
    before 0.7) are read whole by anndata."""
    path = Path(path)
    if not path.is_file():
        raise NbglmError(f"{what} file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if not all(_is_dataframe(f.get(part)) for part in ("obs", "var")):
                labels = None
            else:
                obs, var = f["obs"], f["var"]
                if pert_col not in obs:
                    columns = ", ".join(str(c) for c in np.atleast_1d(obs.attrs.get("column-order", [])))
                    raise NbglmError(
                        f"{what} has no obs column {pert_col!r} (columns: {columns}); set the perturbation column"
                    )
                labels = read_elem(obs[pert_col])
                genes = read_elem(var[var.attrs["_index"]])
                x = read_elem(f["X"]) if "X" in f else None
        if labels is None:
            return ad.read_h5ad(path)
    except NbglmError:
        raise
    except Exception as error:  # h5py/anndata raise many kinds; the user needs the file and reason
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NbglmError(f"cannot read {what} file {path} as h5ad: {reason}") from error
    cells = pd.RangeIndex(len(labels)).astype(str)
    return ad.AnnData(
        X=x,
        obs=pd.DataFrame({pert_col: labels}, index=cells),
        var=pd.DataFrame(index=pd.Index(np.asarray(genes), dtype=str)),
    )


def _is_dataframe(element: h5py.Group | h5py.Dataset | None) -> bool:
    return isinstance(element, h5py.Group) and element.attrs.get("encoding-type") == "dataframe"
