"""VCC metrics (DES, PDS, MAE, baseline-scaled overall score), numerically matching cell-eval 0.8.

Lower layer: imports nothing from nbglm but :mod:`nbglm.errors`.
"""

from nbglm.metrics.de import RankSum, benjamini_hochberg, log2_fold_change, rank_sum_test
from nbglm.metrics.de_cache import GroundTruthCache, build_de_cache, load_de_cache
from nbglm.metrics.evaluate import evaluate
from nbglm.metrics.vcc import (
    METRICS,
    FileSummary,
    MetricResult,
    cell_mean_baseline,
    des,
    mae,
    overall_score,
    pds,
    scaled_scores,
    score,
    summarize_adata,
    to_log1p,
)

__all__ = [
    "METRICS",
    "FileSummary",
    "GroundTruthCache",
    "MetricResult",
    "RankSum",
    "benjamini_hochberg",
    "build_de_cache",
    "cell_mean_baseline",
    "des",
    "evaluate",
    "load_de_cache",
    "log2_fold_change",
    "mae",
    "overall_score",
    "pds",
    "rank_sum_test",
    "scaled_scores",
    "score",
    "summarize_adata",
    "to_log1p",
]
