"""Data layer: built-in synthetic data, h5ad/CSV/embedding loading and validation, splits."""

from nbglm.data.dataset import Dataset

__all__ = ["Dataset"]
