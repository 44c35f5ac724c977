"""Score a prediction against real data with the VCC metrics: the one call a pipeline makes.

Two profiles: `vcc2025` (DES, PDS, MAE; cell-eval 0.8) and `vcc2026` (six members scaled between
baseline and replicate; cell-eval2 0.20). Each has its own real-side cache; `build_cache` and
`load_cache` pick it by profile, and `evaluate` scores with the profile the cache belongs to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from nbglm.errors import NbglmError
from nbglm.data.rows import Rows
from nbglm.metrics.cells import Cells, CellsLike, as_anndata
from nbglm.metrics.de_cache import META, GroundTruthCache, build_de_cache, load_de_cache
from nbglm.metrics.registry import profiles
from nbglm.metrics.vcc2026 import PROFILE as PROFILE_2026
from nbglm.metrics.vcc2026 import Reference, build_reference, evaluate_vcc2026
from nbglm.metrics.vcc import (PROFILE, baseline_summary, baseline_vector, check_pair, overall_score, scaled_scores, score,
                               summarize_adata, summarize_rows)


def evaluate(
    pred: CellsLike,
    real: CellsLike,
    *,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    train: CellsLike | None = None,
    cache: GroundTruthCache | Reference | None = None,
    profile: str = PROFILE,
    overwrite_pred: bool = False,
    overwrite_real: bool = False,
    pred_counts: Rows | None = None,
) -> dict[str, Any]:
    """The metrics of `profile`; for vcc2026 see :func:`nbglm.metrics.vcc2026.evaluate_vcc2026`
    (its baseline comes from `real`, so `train` is not used). For vcc2025:

    DES, PDS, MAE (means and per perturbation) and, given a baseline, the overall score.

    The baseline is the cell-mean model of `train` or, without `train`, the one stored in
    `cache`; with neither, ``overall_score``, ``scaled`` and ``baseline`` are None. A `cache`
    built from `real` (see :func:`nbglm.metrics.build_de_cache`) skips all work on `real`.
    The result holds only str, int, float, None, lists and dicts (JSON-able).
    `pred`, `real`, `train`: AnnData or `Cells` (:func:`nbglm.metrics.read_counts_for_eval`).
    `overwrite_pred` / `overwrite_real`: the caller is done with that AnnData, so the vcc2025 profile
    may normalise its float CSR matrix in place (X's values become log1p) instead of into a copy.
    `pred_counts`: pred's counts when pred.X is None (a prediction written to disk, `Rows` of its
    file): vcc2025 reads them a block of perturbations at a time, so the prediction is never in memory.
    """
    _check_profile(profile, cache)
    if profile != PROFILE:
        pred = as_anndata(pred, None if pred_counts is None else pred_counts.take())
        return evaluate_vcc2026(pred, as_anndata(real), pert_col=pert_col, control=control, cache=cache)
    check_pair(pred, real, pert_col, control)
    if cache is None:  # the baseline is scored with it: real's log1p control cells are at hand there
        cache = build_de_cache(real, train, pert_col=pert_col, control=control, overwrite=overwrite_real)
        train = None
    else:
        cache.check(real, pert_col, control)
    if pred_counts is None:
        pred_summary = summarize_adata(pred, pert_col, control, "pred", overwrite_pred)
    else:
        pred_summary = summarize_rows(pred_counts, pred, pert_col, control, "pred")

    scores = score(pred_summary, cache.real)
    means = {name: result.mean for name, result in scores.items()}
    baseline = cache.baseline
    if train is not None:
        baseline_scores = score(baseline_summary(baseline_vector(train, real, pert_col), real, pert_col, control),
                                cache.real)
        baseline = {name: result.mean for name, result in baseline_scores.items()}
    if baseline is not None and set(baseline) != set(means):
        raise NbglmError(f"the baseline scores name {sorted(baseline)}, expected {sorted(means)}; rebuild the DE cache")
    return {
        **means,
        "overall_score": None if baseline is None else overall_score(means, baseline),
        "scaled": None if baseline is None else scaled_scores(means, baseline),
        "baseline": baseline,
        "n_perturbations": int(cache.real.perts.size),
        "n_genes": int(cache.real.genes.size),
        "per_perturbation": {
            str(pert): dict(zip(scores, map(float, values), strict=True))
            for pert, values in zip(cache.real.perts, _columns(scores), strict=True)
        },
    }


def _columns(scores: dict) -> np.ndarray:
    """(perturbations x metrics) values in the order of `scores`."""
    return np.column_stack([result.values for result in scores.values()])


def _check_profile(profile: str, cache: GroundTruthCache | Reference | None) -> None:
    if profile not in profiles():
        raise NbglmError(f"unknown metric profile {profile!r}; known: {', '.join(profiles())}")
    if cache is not None and cache_profile(cache) != profile:
        raise NbglmError(f"the DE cache is a {cache_profile(cache)} cache, not a {profile} one; score with the profile "
                         f"{cache_profile(cache)}, or rebuild it with `nbglm build-de-cache --profile {profile}`")


def cache_profile(cache: GroundTruthCache | Reference) -> str:
    return PROFILE_2026 if isinstance(cache, Reference) else PROFILE


def build_cache(real: CellsLike, train: CellsLike | None = None, *, profile: str = PROFILE,
                pert_col: str = "target_gene", control: str = "non-targeting",
                train_counts: Rows | None = None, real_counts: Rows | None = None) -> GroundTruthCache | Reference:
    """The real side of `profile`, computed once for many evaluations of predictions of `real`
    (`train_counts` / `real_counts`: the counts when train.X / real.X is None, read a chunk at a time)."""
    _check_profile(profile, None)
    if profile == PROFILE:
        return build_de_cache(real, train, pert_col=pert_col, control=control, train_counts=train_counts,
                              real_counts=real_counts)
    real = as_anndata(real, None if real_counts is None else real_counts.take())
    return build_reference(real, pert_col=pert_col, control=control)


def load_cache(directory: str | Path) -> GroundTruthCache | Reference:
    """Read a cache directory of either profile (its meta.json names the profile)."""
    meta = Path(directory) / META
    profile = json.loads(meta.read_text()).get("profile", PROFILE) if meta.is_file() else PROFILE
    return Reference.load(directory) if profile == PROFILE_2026 else load_de_cache(directory)


def load_kernels(profile: str = PROFILE) -> None:
    """Score a tiny made-up prediction with `profile`, so that numba's first loads (its typing
    registries and each kernel's cached machine code, ~0.3 s per process) are paid now, e.g. on a
    thread while a command reads its files. Nothing else may run compiled kernels meanwhile."""
    rng = np.random.default_rng(0)
    genes = np.array([f"g{j}" for j in range(40)])
    group = np.repeat(np.arange(5), [40, 20, 20, 20, 20])
    labels = np.array(["control", "g0", "g1", "g2", "g3"])[group]  # vcc2026: targets are genes
    effects = np.where(rng.random((5, 40)) < 0.3, rng.choice([0.2, 4.0], (5, 40)), 1.0)
    effects[0] = 1.0
    rates = rng.gamma(0.5, 12.0, 40) * effects[group]

    def cells() -> Cells:
        return Cells(sp.csr_matrix(rng.poisson(rates).astype(np.float32)), "perturbation", labels, genes)

    real = cells()
    evaluate(cells(), real, pert_col="perturbation", control="control", profile=profile,
             train=cells() if profile == PROFILE else None)
