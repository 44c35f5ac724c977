"""VCC metrics (DES, PDS, MAE, baseline-scaled overall score), numerically matching cell-eval 0.8.

Imports no torch, model, training, pipeline or sweep code: metrics score files, whoever made them.
Every metric is registered once in :mod:`nbglm.metrics.registry`.
"""

from nbglm.metrics.de import RankSum, benjamini_hochberg, log2_fold_change, rank_sum_test
from nbglm.metrics.de_cache import GroundTruthCache, build_de_cache, load_de_cache
from nbglm.metrics.evaluate import evaluate
from nbglm.metrics.io import read_counts_for_eval
from nbglm.metrics.registry import METRICS, Metric, names, profile_metrics
from nbglm.metrics.vcc import (
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
    "Metric",
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
    "names",
    "overall_score",
    "pds",
    "profile_metrics",
    "rank_sum_test",
    "read_counts_for_eval",
    "scaled_scores",
    "score",
    "summarize_adata",
    "to_log1p",
]
