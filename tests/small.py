"""The reduced synthetic config that the fitting and sampling tests share."""

from __future__ import annotations

from nbglm.config import Config, load_config

# Reduced synthetic data (500 genes, ~40 cells per perturbation): ~2 s per concise fit on 2 cores.
SMALL = ["data.synthetic.n_genes=500", "data.synthetic.cells_per_pert=40", "data.synthetic.n_control=600",
         "train.epochs=15", "train.lr=2e-3"]


def small_cfg(*overrides: str) -> Config:
    return load_config(None, [*SMALL, *overrides])
