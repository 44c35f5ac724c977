"""Runs the sweep did not make: the baselines through the sweep's folds and seeds, and a best config
whose unit bundles are gone. Each runs in-process on fold data built once, bundles in a temp dir;
like the sweep's units they never see the test set.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pandas as pd

from nbglm import atomic
from nbglm.baselines import BASELINES
from nbglm.config import Config, from_dict, load_config
from nbglm.errors import NbglmError
from nbglm.report.read import Sweep, _read_csv

BASELINE_PROFILE = "vcc2025"  # the baselines predict log1p expression; vcc2026 scores raw counts only


def baseline_columns(sweep: Sweep) -> list[str]:
    return ["model", "fold", "seed", *sweep.metrics]


def _cv_runs(sweep: Sweep, cfgs: list[Config]) -> Iterator[tuple[int, dict]]:
    """(fold, metrics) of each experiment on each of the sweep's folds, in cfgs x folds order; the
    folds are built once, from the first config's data config."""
    from nbglm.data.load import read_inputs
    from nbglm.pipeline import run_experiment
    from nbglm.sweep.folds import build_fold

    inputs = replace(read_inputs(cfgs[0], on_disk=True), test=None, test_x=None)
    built = [build_fold(cfgs[0], inputs, sweep.folds, f) for f in range(sweep.n_folds)]
    with tempfile.TemporaryDirectory(prefix="nbglm-report-") as tmp:
        for i, cfg in enumerate(cfgs):
            for fold, (data, cache) in enumerate(built):
                bundle = Path(tmp) / f"run_{i}_fold_{fold}"
                yield fold, run_experiment(cfg, data, bundle_dir=bundle, de_cache=cache).metrics


def compute_baselines(sweep: Sweep) -> pd.DataFrame:
    """Each baseline for each fold and seed of the sweep, on the sweep's base experiment config."""
    from nbglm.pipeline import with_seed

    base = from_dict(sweep.base)
    jobs = [(model, seed) for model in BASELINES for seed in sweep.seeds]
    cfgs = [with_seed(replace(base, model=replace(base.model, name=model)), seed) for model, seed in jobs]
    runs = iter(_cv_runs(sweep, cfgs))
    rows = [{"model": model, "fold": fold, "seed": seed, **{m: metrics[m] for m in sweep.metrics}}
            for model, seed in jobs for fold, metrics in (next(runs) for _ in range(sweep.n_folds))]
    return pd.DataFrame(rows, columns=baseline_columns(sweep))


def baselines(sweep: Sweep) -> pd.DataFrame:
    """results/baselines.csv, computed and written (atomically) the first time."""
    path = sweep.path / "results" / "baselines.csv"
    if path.is_file():
        df = _read_csv(path, ["fold", "seed", *sweep.metrics])
        missing = set(baseline_columns(sweep)) - set(df)
        if missing:
            raise NbglmError(f"{path} lacks columns {sorted(missing)}; delete it and the report recomputes it")
        return df
    df = compute_baselines(sweep)
    atomic.write_text(path, df.to_csv(index=False))
    return df


def per_perturbation(sweep: Sweep, trial_id: str) -> tuple[pd.DataFrame, dict[str, float], str]:
    """(per-perturbation scores of a config over its ok units, for each metric of the profile that
    has one (DES/PDS/MAE; the vcc2026 members but the ratio-of-sums expression error): each training
    perturbation is scored in the fold that holds it out, once per seed; mean and std per pert, the
    baseline's mean scores over the folds (cell_mean, or vcc2026's mean-response baseline), where
    they came from). Rerun for the first seed only if the sweep's unit bundles are gone."""
    ok = sweep.trials[(sweep.trials["trial_id"] == trial_id) & (sweep.trials["status"] == "ok")]
    files = [p for f, s in zip(ok["fold"], ok["seed"])
             if (p := sweep.unit_bundle(trial_id, int(f), int(s)) / "metrics" / "metrics.json").is_file()
             and not (p.parents[1] / atomic.FAILED).exists()]
    if files:
        runs = [json.loads(p.read_text()) for p in files]
        source = f"{len(runs)} unit bundle(s) of trial {trial_id}"
    else:
        from nbglm.pipeline import with_seed

        cfg = load_config(sweep.path / "results" / "best_config.yaml")
        runs = [metrics for _, metrics in _cv_runs(sweep, [with_seed(cfg, sweep.seeds[0])])]
        source = f"a rerun of trial {trial_id} for seed {sweep.seeds[0]} (its unit bundles are gone)"
    rows = [{"pert": pert, **scores} for run in runs for pert, scores in run["per_perturbation"].items()]
    members = [m for m in sweep.metrics[1:] if rows and m in rows[0]]
    table = pd.DataFrame(rows).groupby("pert")[members].agg(["mean", "std"])
    key = "baseline" if sweep.profile == BASELINE_PROFILE else f"{sweep.profile}_baseline"
    baselines = pd.DataFrame([run[key] for run in runs if run.get(key)])
    return table, baselines.mean().to_dict() if len(baselines) else {}, source
