"""Runs the sweep did not make: the baselines on the sweep's data and seeds, and a best config
whose seed bundles are gone. Each is run in-process on data loaded once, bundles in a temp dir.
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
from nbglm.report.read import METRICS, Sweep, _read_csv

BASELINE_COLUMNS = ["model", "seed", "des", "pds", "mae", "overall_score"]


def _scored_runs(cfgs: list[Config]) -> Iterator[dict]:
    """The metrics of each experiment, run in-process on data loaded once; bundles go to a temp dir."""
    from nbglm.pipeline import load_inputs, run_experiment

    data, de_cache = load_inputs(cfgs[0])
    with tempfile.TemporaryDirectory(prefix="nbglm-report-") as tmp:
        for i, cfg in enumerate(cfgs):
            yield run_experiment(cfg, data, bundle_dir=Path(tmp) / f"run_{i}", de_cache=de_cache).metrics


def compute_baselines(sweep: Sweep) -> pd.DataFrame:
    """Each baseline for each seed of the sweep, on the sweep's base experiment config."""
    from nbglm.pipeline import with_seed

    base = from_dict(sweep.base)
    base = replace(base, pipeline=replace(base.pipeline, mode="train_sample_eval"))  # baselines have no ckpt
    jobs = [(model, seed) for model in BASELINES for seed in sweep.seeds]
    cfgs = [with_seed(replace(base, model=replace(base.model, name=model)), seed) for model, seed in jobs]
    rows = [{"model": model, "seed": seed, **{m: metrics[m] for m in BASELINE_COLUMNS[2:]}}
            for (model, seed), metrics in zip(jobs, _scored_runs(cfgs))]
    return pd.DataFrame(rows, columns=BASELINE_COLUMNS)


def baselines(sweep: Sweep) -> pd.DataFrame:
    """results/baselines.csv, computed and written (atomically) the first time."""
    path = sweep.path / "results" / "baselines.csv"
    if path.is_file():
        df = _read_csv(path, ["seed", *METRICS])
        missing = set(BASELINE_COLUMNS) - set(df)
        if missing:
            raise NbglmError(f"{path} lacks columns {sorted(missing)}; delete it and the report recomputes it")
        return df
    df = compute_baselines(sweep)
    atomic.write_text(path, df.to_csv(index=False))
    return df


def per_perturbation(sweep: Sweep, trial_id: str) -> tuple[pd.DataFrame, dict[str, float], str]:
    """(per-perturbation DES/PDS/MAE of a config over its ok seeds: mean and std per pert, the
    cell_mean baseline's mean scores, where they came from). Rerun for the first seed only if the
    sweep's seed bundles are gone."""
    ok = sweep.trials[(sweep.trials["trial_id"] == trial_id) & (sweep.trials["status"] == "ok")]
    files = [p for s in ok["seed"] if (p := sweep.seed_bundle(trial_id, int(s)) / "metrics" / "metrics.json").is_file()]
    if files:
        runs = [json.loads(p.read_text()) for p in files]
        source = f"{len(runs)} seed bundle(s) of trial {trial_id}"
    else:
        from nbglm.pipeline import with_seed

        cfg = load_config(sweep.path / "results" / "best_config.yaml")
        runs = list(_scored_runs([with_seed(cfg, sweep.seeds[0])]))
        source = f"a rerun of trial {trial_id} for seed {sweep.seeds[0]} (its seed bundles are gone)"
    rows = [{"pert": pert, **scores} for run in runs for pert, scores in run["per_perturbation"].items()]
    table = pd.DataFrame(rows).groupby("pert")[["des", "pds", "mae"]].agg(["mean", "std"])
    return table, dict(runs[0].get("baseline") or {}), source
