"""VCC metrics: the `vcc2025` profile (DES, PDS, MAE, baseline-scaled overall score), numerically
matching cell-eval 0.8, and the `vcc2026` profile (six members scaled between a mean-response
baseline and a split-half replicate, and their mean), matching cell-eval2 0.20.

Imports no torch, model, training, pipeline or sweep code: metrics score files, whoever made them.
Every metric is registered once in :mod:`nbglm.metrics.registry`.
"""

from nbglm.metrics.de import log2_fold_change, rank_sum_test
from nbglm.metrics.de_cache import GroundTruthCache, build_de_cache, load_de_cache
from nbglm.metrics.evaluate import build_cache, cache_profile, evaluate, load_cache
from nbglm.metrics.fdr import benjamini_hochberg
from nbglm.metrics.io import read_counts_for_eval
from nbglm.metrics.mwu import RankSum
from nbglm.metrics.normalise import to_log1p
from nbglm.metrics.registry import METRICS, Metric, get, names, profile_metrics, profiles, values
from nbglm.metrics.vcc import (
    FileSummary,
    MetricResult,
    baseline_vector,
    cell_mean_baseline,
    des,
    mae,
    overall_score,
    pds,
    scaled_scores,
    score,
    summarize_adata,
)
from nbglm.metrics.vcc2026 import MEMBERS as VCC2026_MEMBERS
from nbglm.metrics.vcc2026 import Reference, build_reference, check_submission, evaluate_vcc2026

__all__ = [
    "METRICS",
    "VCC2026_MEMBERS",
    "Reference",
    "build_cache",
    "build_reference",
    "cache_profile",
    "check_submission",
    "evaluate_vcc2026",
    "get",
    "load_cache",
    "profiles",
    "values",
    "FileSummary",
    "Metric",
    "GroundTruthCache",
    "MetricResult",
    "RankSum",
    "benjamini_hochberg",
    "build_de_cache",
    "baseline_vector",
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
