"""Baselines the NB-GLM must beat, each predicting the held-out perturbations like the model does.

- `cell_mean`: the VCC baseline. Every predicted cell is the mean of the training groups'
  log1p pseudobulks (control included, as cell-eval builds it); its overall score is 0 by design.
- `control`: real control cells resampled for each perturbation ("nothing happens").
- `linear`: ridge regression from a perturbation's embedding to its pseudobulk effect
  (log1p pseudobulk minus control), fitted on the training perturbations — the additive/linear
  baseline Ahlmann-Eltze et al. (Nature Methods 2025) found hard to beat with deep models.

Predictions have the pred.h5ad layout (held-out cells, then real control cells, genes in training
order); `cell_mean` and `linear` are in log1p space, which the metrics take as is.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from nbglm.config import Config
from nbglm.data import Dataset, pseudobulks
from nbglm.metrics import to_log1p

# The baseline registry: the only list of baseline names (model.name values besides lowrank_nb_glm).
BASELINES: dict[str, str] = {
    "cell_mean": "the VCC baseline: every cell is the mean of the training groups' log1p pseudobulks",
    "linear": "ridge map from a perturbation's embedding to its log1p pseudobulk effect",
    "control": "real control cells resampled: nothing happens",
}


def _ridge_effects(data: Dataset, names: np.ndarray, bulks: np.ndarray, lam: float) -> np.ndarray:
    """Predicted held-out effects from a ridge map (with intercept) embedding -> training effect."""
    ctrl = bulks[names == data.control][0]
    train = [p for p in data.train_perts if p in set(names)]
    rows = {name: i for i, name in enumerate(names)}
    y = bulks[[rows[p] for p in train]] - ctrl
    x = data.pert_emb.loc[train].to_numpy(np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc = x - x_mean
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    heldout = data.pert_emb.loc[data.heldout_perts].to_numpy(np.float64)
    return ctrl + y_mean + (heldout - x_mean) @ w


def predict_baseline(cfg: Config, data: Dataset, seed: int) -> ad.AnnData:
    """The held-out prediction of baseline `cfg.model.name`, in the pred.h5ad layout."""
    name = cfg.model.name
    perts = data.heldout_perts
    n_cells = data.heldout["n_cells"].fillna(cfg.sampling.n_cells_default).to_numpy(np.int64)
    labels = np.repeat(np.array(perts, dtype=object), n_cells)
    controls = data.control_cells()
    if name == "control":
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, controls.n_obs, labels.size)
        cells = sp.csr_matrix(controls.X[pick], dtype=np.float32)
        ctrl_x = sp.csr_matrix(controls.X, dtype=np.float32)
    else:
        names, bulks = pseudobulks(to_log1p(data.train, "training data"), data.train.obs[data.pert_col].to_numpy(str))
        if name == "cell_mean":
            profiles = np.broadcast_to(bulks.mean(axis=0), (len(perts), bulks.shape[1]))
        else:
            profiles = np.clip(_ridge_effects(data, names, bulks, cfg.model.ridge_lambda), 0.0, None)
        cells = sp.csr_matrix(np.repeat(profiles, n_cells, axis=0).astype(np.float32))
        source = data.control_source()  # normalised as a whole file, as the metrics see it
        is_ctrl = (source.obs[data.pert_col].astype(str) == data.control).to_numpy()
        ctrl_x = sp.csr_matrix(to_log1p(source, "control cells' file")[np.flatnonzero(is_ctrl)], dtype=np.float32)
    obs = pd.DataFrame({data.pert_col: np.concatenate([labels, np.full(controls.n_obs, data.control, dtype=object)])},
                       index=[f"{name}_{i}" for i in range(labels.size + controls.n_obs)])
    obs[data.pert_col] = pd.Categorical(obs[data.pert_col])
    return ad.AnnData(X=sp.vstack([cells, ctrl_x], format="csr"), obs=obs,
                      var=pd.DataFrame(index=pd.Index(data.gene_names)))
