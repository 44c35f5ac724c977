"""Data layer: built-in synthetic data, h5ad/CSV/embedding loading and validation, splits."""

from nbglm.data.dataset import PHASES, Dataset, pseudobulks
from nbglm.data.load import load_dataset
from nbglm.data.synthetic import SyntheticData, make_synthetic, write_synthetic

__all__ = ["PHASES", "Dataset", "SyntheticData", "load_dataset", "make_synthetic", "pseudobulks", "write_synthetic"]
