"""Reference values from cell-eval2 (run inside its own venv, not nbglm's).

Usage: python celleval2_ref.py REAL.h5ad PRED.h5ad PERT_COL CONTROL OUT.json [--no-anchor]

Writes the per-perturbation values of the vcc2026 members, their panel aggregates, the
baseline and replicate-anchor aggregates and the replicate-scaled scores, all computed by
cell-eval2's own functions under its shipped `vcc2026` preset. Kept free of nbglm imports so
it runs in the isolated environment the parity tests build.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import warnings
from dataclasses import replace

import anndata as ad
import polars as pl

from cell_eval2.anchor import compute_replicate_anchor
from cell_eval2.baseline import build_generic_baseline
from cell_eval2.catalog import CATALOG
from cell_eval2.config import EvalConfig
from cell_eval2.run import aggregate_metrics_wide, compute_metrics, metric_output_names
from cell_eval2.scoring import score_one

SCORED = ("pds_cosine", "expr_mse_unbiased_capped_norm",
          "de_wilcoxon_direction_fidelity_yield_raw", "de_wilcoxon_direction_reach_raw",
          "de_wilcoxon_sig_jaccard", "de_wilcoxon_lfc_nmae")
PER_PERT = ("pds_cosine", "de_wilcoxon_direction_fidelity_yield_raw",
            "de_wilcoxon_direction_reach_raw", "de_wilcoxon_sig_jaccard",
            "de_wilcoxon_lfc_nmae", "expr_mse_unbiased_capped", "expr_distance_unbiased")


def _clean(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _means(agg: pl.DataFrame) -> dict:
    row = agg.filter(pl.col("statistic") == "mean")
    return {m: _clean(row[m][0]) for m in SCORED}


def main() -> None:
    real_path, pred_path, pert_col, control, out = sys.argv[1:6]
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    cfg = replace(EvalConfig.from_preset("vcc2026"), pert_col=pert_col, control=control)
    real = ad.read_h5ad(real_path)
    pred = ad.read_h5ad(pred_path)
    tidy = compute_metrics(pred, real, config=cfg)
    names = metric_output_names(cfg)
    user = _means(aggregate_metrics_wide(tidy, metrics=names))
    per = {m: {} for m in PER_PERT}
    for p, m, v in tidy.select(["perturbation", "metric", "value"]).iter_rows():
        if m in per:
            per[m][p] = _clean(v)
    result = {"per_perturbation": per, "user": user}
    if "--no-anchor" not in sys.argv:
        base = _means(build_generic_baseline(real, config=cfg).agg)
        _splits, anchor = compute_replicate_anchor(real, config=cfg)
        rep = {m: _clean(v) for m, v in zip(anchor["metric"].to_list(),
                                            anchor["replicate"].to_list()) if m in SCORED}
        scaled = {}
        for m in SCORED:
            policy = replace(CATALOG[m].scoring, anchor=rep[m], allow_negative_baseline=False)
            scaled[m] = score_one(user[m], base[m], policy)
        result.update(baseline=base, replicate=rep, scaled=scaled,
                      score=sum(scaled.values()) / len(scaled))
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
