"""Cross-validation folds over the training perturbations, for choosing a config without the test set.

Perturbations are assigned to K folds whole (all cells of a perturbation on one side); control
cells are assigned to folds too, one by one, so a fold's validation controls are not among its
training cells. Fold f's training part is every other fold's perturbations and controls; its
validation part is fold f's perturbations with fold f's controls, scored like a test set.
"""

from __future__ import annotations

from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd

from nbglm.data.io import pert_labels, val_list
from nbglm.data.load import Inputs
from nbglm.errors import NbglmError

FOLD_COLUMNS = ("kind", "label", "fold")  # kind: perturbation (label = its name) | control (label = obs name)


def assign_folds(inputs: Inputs, pert_col: str, control: str, k: int, seed: int) -> pd.DataFrame:
    """A seeded fold for every training perturbation and every control cell (the table saved as folds.csv)."""
    perts = sorted(pert_labels(inputs.train, pert_col, control))
    labels = inputs.train.obs[pert_col].astype(str).to_numpy()
    controls = inputs.train.obs_names[labels == control].to_numpy(str)
    if k < 2:
        raise NbglmError(f"selection.folds = {k}: cross-validation needs at least 2 folds")
    if k > len(perts):
        raise NbglmError(f"selection.folds = {k} but the training data has only {len(perts)} perturbations: "
                         f"use at most {len(perts)} folds")
    if controls.size < 2 * k:
        raise NbglmError(f"selection.folds = {k} needs at least {2 * k} control cells (2 per fold), the training "
                         f"data has {controls.size}; use fewer folds")
    if len(set(controls)) != controls.size:
        raise NbglmError("control cells' obs_names are not unique; make them unique (adata.obs_names_make_unique())")
    rng = np.random.default_rng(seed)
    pert_fold = rng.permutation(len(perts)) % k
    ctrl_fold = rng.permutation(controls.size) % k
    return pd.DataFrame({
        "kind": ["perturbation"] * len(perts) + ["control"] * controls.size,
        "label": perts + controls.tolist(),
        "fold": np.concatenate([pert_fold, ctrl_fold]).astype(int),
    })


def fold_inputs(inputs: Inputs, folds: pd.DataFrame, fold: int, pert_col: str, control: str) -> Inputs:
    """Fold `fold` as a train/validation pair: the validation part plays the test set, and its
    held-out list is computed from its cells; the real test set is not part of it.

    Both parts are row subsets of the training counts (`Inputs.train_x`, `Inputs.test_x`), read a
    chunk at a time by whatever learns from them: no part is copied."""
    train = inputs.train
    labels = train.obs[pert_col].astype(str).to_numpy()
    held = folds["fold"].to_numpy() == fold
    is_pert = folds["kind"].to_numpy() == "perturbation"
    val_perts = folds["label"].to_numpy()[held & is_pert]
    val_controls = folds["label"].to_numpy()[held & ~is_pert]
    in_val = pd.Index(labels).isin(val_perts) | ((labels == control) & train.obs_names.isin(val_controls))
    counts = inputs.train_counts()
    val, val_x = ad.AnnData(obs=train.obs[in_val].copy(), var=train.var.copy()), counts.subset(in_val)
    part = ad.AnnData(obs=train.obs[~in_val].copy(), var=train.var.copy())
    return replace(inputs, train=part, train_x=counts.subset(~in_val), test=val, test_x=val_x,
                   heldout=val_list(val, pert_col, control, val_x.totals()))
