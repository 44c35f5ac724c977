"""Data layer: built-in synthetic data, h5ad/CSV/embedding loading and validation, splits.

Its names are imported when first asked for, so that `nbglm.data.rows` (the count matrices the
metrics read) comes without anndata and pandas, which the rest of the layer needs."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbglm.data.dataset import PHASES, Dataset
    from nbglm.data.load import load_dataset
    from nbglm.data.rows import pseudobulks
    from nbglm.data.synthetic import SyntheticData, make_synthetic, write_synthetic

_HOME = {"PHASES": "dataset", "Dataset": "dataset", "load_dataset": "load", "pseudobulks": "rows",
         "SyntheticData": "synthetic", "make_synthetic": "synthetic", "write_synthetic": "synthetic"}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'nbglm.data' has no attribute {name!r}")
    return getattr(import_module(f"nbglm.data.{_HOME[name]}"), name)
