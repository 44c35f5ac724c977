"""Sweep report: `nbglm report SWEEP_DIR` -> `SWEEP_DIR/report/` (PNG figures + one self-contained HTML).

read.py reads a sweep directory, runs.py runs what the sweep did not (the baselines, on the sweep's
base experiment config and seeds, kept in `results/baselines.csv`; a best config whose bundles are
gone), figures.py draws, html.py writes the page. `nbglm sweep` writes a report when the sweep
ends (`report_after_sweep`); a failure there is a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nbglm import atomic
from nbglm.baselines import BASELINES
from nbglm.errors import NbglmError
from nbglm.metrics import METRICS as REGISTRY
from nbglm.report.figures import (N_COMPARED, axis_label, plot_best_vs_baselines, plot_cv_vs_test,
                                  plot_metric_vs_params, plot_pareto, plot_per_perturbation)
from nbglm.report.html import render_html
from nbglm.report.read import load_sweep
from nbglm.report.runs import BASELINE_PROFILE, baselines, per_perturbation

log = logging.getLogger("nbglm")


def write_report(sweep_dir: str | Path, top: int = 10) -> Path:
    """Write `<sweep_dir>/report/` (figures and report.html); returns the HTML path."""
    sweep = load_sweep(sweep_dir)
    ranked = sweep.ranked()
    if ranked.empty:
        raise NbglmError(f"no config of sweep '{sweep.name}' has a scored seed yet: nothing to report")
    out = sweep.path / "report"
    best = ranked.iloc[0]["trial_id"]
    table, baseline, source = per_perturbation(sweep, best)
    vs_params = {m: (plot_metric_vs_params(sweep, m, out / f"{m}_vs_params.png"),
                     f"{axis_label(m)} of each config (cross-validated: mean ± std over folds x seeds; grey dots: "
                     f"single units) against each swept hyperparameter; red star: best config {best}.")
                 for m in sweep.metrics}
    with_baselines = sweep.profile == BASELINE_PROFILE
    titles = ", ".join(REGISTRY[m].title for m in dict.fromkeys(table.columns.get_level_values(0)))
    what = "the cell_mean baseline's mean" if with_baselines else f"the {sweep.profile} mean-response baseline's mean"
    figures = [
        vs_params[sweep.metrics[0]],
        *([(plot_best_vs_baselines(sweep, baselines(sweep), out / "best_vs_baselines.png"),
            f"Top {min(N_COMPARED, len(ranked))} configs beside the baselines ({', '.join(BASELINES)}) on the "
            "same folds and seeds; error bars: std over folds x seeds.")] if with_baselines else []),
        (plot_cv_vs_test(sweep, out / "cv_vs_test.png"),
         "Each config's cross-validated score (it chose the config) and, for the refit configs, the test score "
         "measured once afterwards; the gap is the optimism of the selection."),
        (plot_per_perturbation(sweep, table, baseline, best, out / "per_perturbation.png"),
         f"Best config {best}: {titles} of each training perturbation in the fold that held it out "
         f"(from {source}); dashed: {what}."),
        *(vs_params[m] for m in sweep.metrics[1:]),
    ]
    if len(sweep.objectives) > 1:
        figures.insert(1, (plot_pareto(sweep, out / "pareto.png"),
                           f"Multi-objective search over {', '.join(m for m, _ in sweep.objectives)}: the Pareto "
                           f"front (red; its configs in results/pareto/) and the config picked from it by the best "
                           f"{axis_label(sweep.metric)} (star, best_config.yaml)."))
    if with_baselines:
        notes = [f"Baselines: {sweep.path / 'results' / 'baselines.csv'}; "
                 f"best config: {sweep.path / 'results' / 'best_config.yaml'}."]
    else:
        notes = [f"No baseline models: they predict log1p expression and {sweep.profile} scores raw counts; its "
                 f"scale puts the mean-response baseline at 0. Best config: "
                 f"{sweep.path / 'results' / 'best_config.yaml'}."]
    path = out / "report.html"
    atomic.write_text(path, render_html(sweep, figures, top, notes))
    return path


def report_after_sweep(sweep_dir: str | Path) -> None:
    """The sweep driver's last step: a report that fails is a warning, never a failed sweep."""
    try:
        path = write_report(sweep_dir)
    except Exception as exc:  # the sweep's results are already written; the report can be redone
        log.warning("sweep report not written (%s: %s); retry with: nbglm report %s",
                    type(exc).__name__, exc, sweep_dir)
        return
    print(f"sweep report: {path}", flush=True)
