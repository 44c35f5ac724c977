"""After the search: refit the best configs on all training perturbations and predict the held-out list.

The top `selection.refit_top` configs by cross-validated score are trained on every training
perturbation with every seed of the sweep and predict the held-out perturbations (the test file's,
or the list of `paths.val_list_csv` when there is no ground truth). This is the only place a sweep
reads the test set, and it chooses nothing: the choice was made by cross-validation.

`results/final/` holds the selected config's `config.yaml`, one seed's `pred.h5ad` (the VCC
submission layout) and, with ground truth, `metrics.json`: test metrics as mean ± std over seeds
beside each refit config's cross-validated score.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from nbglm import atomic
from nbglm.config import from_dict, to_yaml
from nbglm.data.load import Inputs, assemble
from nbglm.pipeline import load_inputs
from nbglm.sweep.aggregate import ranked_rows
from nbglm.sweep.folds import for_units
from nbglm.sweep.space import SweepSpec
from nbglm.sweep.units import UnitPool, unit_stats

FINAL = "final"  # refit bundles: <sweep dir>/final/config_<id>/seed_<s>/


def _stats(row: dict, metrics: tuple[str, ...]) -> dict[str, dict]:
    return {m: {"mean": row[f"{m}_mean"], "std": row[f"{m}_std"], "n": row["n_units_ok"]} for m in metrics}


def refit(spec: SweepSpec, base: dict, rows: list[dict], inputs: Inputs, *, cpu: float, gpu: float,
          faults: dict) -> dict[str, Any] | None:
    """Refit the top configs, write results/final/, and return its summary (None: nothing scored)."""
    top = ranked_rows(spec, rows)[: spec.selection.refit_top]
    if not top:
        return None
    saved = spec.sweep_dir / FINAL / "summary.json"
    if saved.is_file():  # a resumed sweep whose refit had finished: nothing to redo
        summary = json.loads(saved.read_text())
        if [c["trial_id"] for c in summary["configs"]] == [r["trial_id"] for r in top]:
            return summary
    has_truth = inputs.test is not None
    pool = UnitPool(cpu, gpu, faults)
    configs = []
    for row in top:
        cfg = from_dict(spec.experiment_dict({k: row[k] for k in spec.space}, base))
        cfg = replace(cfg, pipeline=replace(cfg.pipeline, keep_preds=True,
                                            mode="train_sample_eval" if has_truth else "train_sample"))
        data, cache = load_inputs(cfg, assemble(cfg, inputs))
        data_ref, cache_ref = ray.put(for_units(cfg, data)), ray.put(cache) if cache is not None else None
        for seed in spec.seeds:
            pool.submit(cfg, seed, None, data_ref, cache_ref, spec.sweep_dir / FINAL / f"config_{row['trial_id']}"
                        / f"seed_{seed}")
        configs.append((row, cfg))
    records: list[dict] = []
    while len(pool):
        records += [payload[0] for kind, _, *payload in pool.poll(timeout=1.0) if kind == "done"]
    summary = {"selected": top[0]["trial_id"], "metric": spec.rank_metric, "mode": spec.rank_mode,
               "has_ground_truth": has_truth, "seeds": list(spec.seeds), "configs": []}
    for row, _ in configs:
        recs = [r for r in records if Path(r["bundle"]).parent.name == f"config_{row['trial_id']}"]
        entry: dict[str, Any] = {"trial_id": row["trial_id"], "params": {k: row[k] for k in spec.space},
                                 "cv": _stats(row, spec.metrics), "failed_seeds": [r["seed"] for r in recs if r["status"] != "ok"],
                                 "units": sorted(recs, key=lambda r: r["seed"])}
        if has_truth:
            entry["test"] = unit_stats(recs, spec.metrics)
            cv, test = entry["cv"][spec.rank_metric]["mean"], entry["test"][spec.rank_metric]["mean"]
            entry["cv_minus_test"] = None if test is None else cv - test
        summary["configs"].append(entry)
    _write_final(spec, configs[0][1], summary)
    atomic.write_json(saved, summary)
    return summary


def _write_final(spec: SweepSpec, cfg: Any, summary: dict[str, Any]) -> None:
    """results/final/: config.yaml and one seed's pred.h5ad of the selected config, metrics.json."""
    out = spec.sweep_dir / "results" / FINAL
    bundles = sorted(p for p in (spec.sweep_dir / FINAL / f"config_{summary['selected']}").glob("seed_*/preds/pred.h5ad")
                     if not (p.parents[1] / atomic.FAILED).exists())  # a seed that failed after sampling
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "config.yaml", f"# Selected by cross-validation in sweep '{spec.name}' (trial "
                      f"{summary['selected']}); refit on all training perturbations.\n" + to_yaml(cfg))
    if bundles:
        with atomic.atomic_path(out / "pred.h5ad") as tmp:
            shutil.copyfile(bundles[0], tmp)
    if summary["has_ground_truth"]:
        atomic.write_json(out / "metrics.json", summary)
