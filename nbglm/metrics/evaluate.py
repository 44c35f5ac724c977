"""Score a prediction against real data with the VCC metrics: the one call a pipeline makes."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

from nbglm.errors import NbglmError
from nbglm.metrics.de_cache import GroundTruthCache, build_de_cache
from nbglm.metrics.vcc import baseline_summary, check_pair, overall_score, scaled_scores, score, summarize_adata


def evaluate(
    pred: ad.AnnData,
    real: ad.AnnData,
    *,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    train: ad.AnnData | None = None,
    cache: GroundTruthCache | None = None,
) -> dict[str, Any]:
    """DES, PDS, MAE (means and per perturbation) and, given a baseline, the overall score.

    The baseline is the cell-mean model of `train` or, without `train`, the one stored in
    `cache`; with neither, ``overall_score``, ``scaled`` and ``baseline`` are None. A `cache`
    built from `real` (see :func:`nbglm.metrics.build_de_cache`) skips all work on `real`.
    The result holds only str, int, float, None, lists and dicts (JSON-able).
    """
    check_pair(pred, real, pert_col, control)
    if cache is None:
        cache = build_de_cache(real, pert_col=pert_col, control=control)
    else:
        cache.check(real, pert_col, control)
    pred_summary = summarize_adata(pred, pert_col, control, "pred")

    scores = score(pred_summary, cache.real)
    means = {name: result.mean for name, result in scores.items()}
    baseline = cache.baseline
    if train is not None:
        baseline_scores = score(baseline_summary(train, real, pert_col, control), cache.real)
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
    return np.column_stack([result.per_perturbation.to_numpy() for result in scores.values()])
