"""Split a Perturb-seq dataset by perturbation: held-out perturbations never appear in training.

Control cells go to both parts: training needs them for the baseline, evaluation for the
reference the DE metrics compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from nbglm.data.io import pert_labels, val_list
from nbglm.errors import NbglmError


def split_by_perturbation(adata: ad.AnnData, pert_col: str, control: str, test_fraction: float | None = None,
                          seed: int = 0, test_perts: Sequence[str] | None = None
                          ) -> tuple[ad.AnnData, ad.AnnData, pd.DataFrame]:
    """Return (train, test, val list); held-out perturbations are `test_perts`, or a seeded random
    `test_fraction` of them (at least one, and at least one left for training)."""
    perts = pert_labels(adata, pert_col, control)
    if (test_fraction is None) == (test_perts is None):
        raise NbglmError("give either a test fraction or an explicit list of test perturbations, not both")
    if test_perts is not None:
        chosen = list(dict.fromkeys(test_perts))
        known = set(perts)
        unknown = [p for p in chosen if p not in known]
        if unknown:
            raise NbglmError(f"test perturbation(s) not in obs['{pert_col}']: {', '.join(unknown[:5])}"
                             f" (present include: {', '.join(perts[:5])})")
    else:
        if not 0.0 < test_fraction < 1.0:
            raise NbglmError(f"test fraction must be in (0, 1), got {test_fraction}")
        n_test = min(max(1, round(test_fraction * len(perts))), len(perts) - 1)
        order = np.random.default_rng(seed).permutation(len(perts))
        ranked = sorted(perts)  # sorted: the pick does not depend on cell order
        picked = {ranked[i] for i in order[:n_test]}
        chosen = [p for p in perts if p in picked]
    if len(perts) - len(chosen) < 1 or not chosen:
        raise NbglmError(f"cannot split {len(perts)} perturbation(s) into non-empty train and test parts")
    labels = adata.obs[pert_col].astype(str).to_numpy()
    in_test = np.isin(labels, chosen)
    train = adata[~in_test].copy()
    test = adata[in_test | (labels == control)].copy()
    for part in (train, test):
        part.obs[pert_col] = pd.Categorical(part.obs[pert_col].astype(str).to_numpy())
    return train, test, val_list(test, pert_col, control)
