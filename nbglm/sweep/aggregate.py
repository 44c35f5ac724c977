"""Sweep export and TensorBoard: what a user reads during and after a sweep.

Everything here is rebuilt from files, so it is exact mid-sweep and after a resume: each unit's
record (`<trial dir>/units/fold_{f}_seed_{s}.json`, written by the trainable when the unit finishes)
plus the trial list Tune keeps. Outputs under `<sweep dir>/results/`: `trials.csv` (one row per
config x fold x seed, with the epochs each unit trained), `configs.csv` (one row per config;
statistics over its folds x seeds: the cross-validated score), `best_config.yaml` (a runnable
experiment config) — and a console table.

A config that early stopping ended is `stopped`: it has no cross-validated score and is never
chosen. A multi-objective sweep marks the Pareto front in configs.csv (`pareto`), writes each front
config to `results/pareto/`, and makes best_config.yaml the front config with the best aggregate
score (`SweepSpec.rank_metric`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbglm import atomic
from nbglm.config import from_dict, to_yaml
from nbglm.sweep.units import unit_record, unit_stats
from nbglm.sweep.space import SweepSpec

_DONE = {"TERMINATED", "ERROR", "STOPPED"}
PARETO = "pareto"  # results/pareto/: one runnable YAML per config on the front


@dataclass
class TrialInfo:
    """What the export needs from one Tune trial (one sampled config)."""

    trial_id: str
    dirname: str  # the trial's directory name under the sweep dir
    params: dict[str, Any]  # searcher values (list choices as their labels)
    status: str  # Tune status (PENDING, RUNNING, PAUSED, TERMINATED, ERROR), or STOPPED by early stopping
    error: str | None = None  # one line, for a trial that ended in ERROR


def record_path(trial_dir: Path, fold: int, seed: int) -> Path:
    return trial_dir / "units" / f"fold_{fold}_seed_{seed}.json"


def read_record(trial_dir: Path, fold: int, seed: int) -> dict | None:
    path = record_path(trial_dir, fold, seed)
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: _fmt(v) for k, v in row.items()} for row in rows)
    atomic.write_text(path, buf.getvalue())


def collect(sweep_dir: Path, spec: SweepSpec, trials: list[TrialInfo]) -> tuple[list[dict], list[dict]]:
    """(rows of trials.csv, rows of configs.csv) for the trials Tune knows, in trial order."""
    trial_rows, config_rows = [], []
    for t in trials:
        params = {k: t.params.get(k) for k in spec.space}
        done = t.status in _DONE
        records = []
        for fold, seed in spec.units():
            rec = read_record(sweep_dir / t.dirname, fold, seed)
            if rec is None:  # not run yet, or the trial died before this unit finished
                rec = unit_record(seed, fold, spec.metrics, status="failed" if t.status == "ERROR" else t.status.lower(),
                                  error=t.error if t.status == "ERROR" else None, epochs_done=None)
            records.append(rec)
            trial_rows.append({
                "trial_id": t.trial_id, **params, "fold": fold, "seed": seed, "status": rec["status"],
                **{m: rec.get(m) for m in spec.metrics}, "epochs_done": rec.get("epochs_done"), "wall_s": rec.get("wall_s"),
                "cpu_s": rec.get("cpu_s"),
                "node_id": rec.get("node_id"),
                "gpu_ids": " ".join(rec.get("gpu_ids") or []), "start": rec.get("start"), "end": rec.get("end"),
                "error": rec.get("error"),
            })
        n_ok = sum(r["status"] == "ok" for r in records)
        status = ("stopped" if t.status == "STOPPED" else "ok" if n_ok == len(records)
                  else "partial" if n_ok and done else "failed" if done else t.status.lower())
        error = next((r["error"] for r in records if r.get("error")), t.error) if status != "ok" else None
        stats = unit_stats(records if status != "stopped" else [], spec.metrics)  # a stopped config has no CV score
        config_rows.append({
            "trial_id": t.trial_id, **params, "status": status, "n_units_ok": n_ok, "n_units": len(records),
            **{f"{m}_{s}": stats[m][s] for m in spec.metrics for s in ("mean", "std", "min", "max")},
            "epochs_done": sum(r.get("epochs_done") or 0 for r in records),
            "unit_s": sum(r.get("wall_s") or 0.0 for r in records), "error": error,
        })
    if spec.multi_objective:
        front = pareto_front(spec, config_rows)
        for row in config_rows:
            row[PARETO] = row["trial_id"] in front
    return trial_rows, config_rows


def _scored(spec: SweepSpec, row: dict) -> bool:
    return row["status"] in ("ok", "partial") and all(row[f"{m}_mean"] is not None for m, _ in spec.objectives)


def _dominates(spec: SweepSpec, a: dict, b: dict) -> bool:
    """a is at least as good as b on every objective and better on one."""
    diffs = [(a[f"{m}_mean"] - b[f"{m}_mean"]) * (1 if mode == "max" else -1) for m, mode in spec.objectives]
    return all(d >= 0 for d in diffs) and any(d > 0 for d in diffs)


def pareto_front(spec: SweepSpec, config_rows: list[dict]) -> set[str]:
    """Trial ids of the scored configs no other scored config dominates (cross-validated means)."""
    scored = [r for r in config_rows if _scored(spec, r)]
    return {r["trial_id"] for r in scored if not any(_dominates(spec, o, r) for o in scored)}


def ranked_rows(spec: SweepSpec, config_rows: list[dict]) -> list[dict]:
    """Configs eligible for the refit, best first: finished and scored (a running config's few finished
    units are no CV score; a stopped config has none), ordered by the cross-validated mean of
    `spec.rank_metric`; with several objectives the Pareto front comes first."""
    sign = 1 if spec.rank_mode == "max" else -1
    scored = [r for r in config_rows if r["status"] in ("ok", "partial") and r[f"{spec.rank_metric}_mean"] is not None]
    front = pareto_front(spec, config_rows) if spec.multi_objective else set()
    return sorted(scored, key=lambda r: (r["trial_id"] not in front, -sign * r[f"{spec.rank_metric}_mean"]))


def export(sweep_dir: Path, spec: SweepSpec, base: dict, trials: list[TrialInfo]) -> list[dict]:
    """Write results/trials.csv, configs.csv and best_config.yaml; return the config rows."""
    out = sweep_dir / "results"
    trial_rows, config_rows = collect(sweep_dir, spec, trials)
    _write_csv(out / "trials.csv", trial_rows)
    _write_csv(out / "configs.csv", config_rows)
    ranked = ranked_rows(spec, config_rows)
    if ranked:
        best = ranked[0]
        rule = (f"; picked from the Pareto front of {', '.join(m for m, _ in spec.objectives)} by the best "
                f"{spec.rank_metric}" if spec.multi_objective else "")
        atomic.write_text(out / "best_config.yaml", _config_yaml(spec, base, best, out / "best_config.yaml",
                                                                 f"Best config{rule}"))
    if spec.multi_objective:
        _write_pareto(spec, base, [r for r in config_rows if r[PARETO]], out / PARETO)
    return config_rows


def _config_yaml(spec: SweepSpec, base: dict, row: dict, path: Path, what: str) -> str:
    """A config row as a runnable experiment YAML, its cross-validated scores in the header."""
    cfg = from_dict(spec.experiment_dict({k: row[k] for k in spec.space}, base))
    scores = ", ".join(f"{m} {row[f'{m}_mean']:.4f}" + (f" +- {row[f'{m}_std']:.4f}" if row[f"{m}_std"] is not None
                                                         else "")
                       for m in dict.fromkeys([spec.rank_metric, *(m for m, _ in spec.objectives)]))
    header = (f"# {what} of sweep '{spec.name}' (trial {row['trial_id']}): cross-validated {scores} over "
              f"{row['n_units_ok']} fold x seed unit(s) on the training perturbations."
              f"\n# Run it: nbglm run --config {path}\n")
    return header + to_yaml(cfg)


def _write_pareto(spec: SweepSpec, base: dict, front: list[dict], out: Path) -> None:
    """results/pareto/config_<trial>.yaml for each front config; configs that left the front are removed."""
    keep = {f"config_{r['trial_id']}.yaml" for r in front}
    for row in front:
        path = out / f"config_{row['trial_id']}.yaml"
        atomic.write_text(path, _config_yaml(spec, base, row, path, "Pareto-front config"))
    for old in out.glob("config_*.yaml") if out.is_dir() else []:
        if old.name not in keep:
            old.unlink()


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def progress_line(spec: SweepSpec, config_rows: list[dict], slots: int) -> str:
    """`k/N configs, best so far, ETA`: printed by the driver whenever a config finishes.

    ETA = units left x mean unit time (over the finished configs' units, stopped ones included) /
    units run at once; the units of configs still running count as left, so it errs long."""
    done = [r for r in config_rows if r["status"] in ("ok", "partial", "failed", "stopped")]
    stopped = sum(r["status"] == "stopped" for r in done)
    n_units = len(spec.units())
    unit_s = sum(r["unit_s"] for r in done) / max(1, n_units * len(done))
    left = (spec.search.num_samples - len(done)) * n_units
    ranked = ranked_rows(spec, config_rows)
    metric = spec.rank_metric
    if not ranked:
        best = "no config scored yet"
    else:
        n_front = sum(bool(r.get(PARETO)) for r in config_rows)
        front = f"Pareto front {n_front} config(s), " if spec.multi_objective else ""
        best = f"{front}best so far {metric} {ranked[0][f'{metric}_mean']:.4f} (trial {ranked[0]['trial_id']})"
    eta = _duration(left * unit_s / max(1, slots)) if done else "unknown"
    return (f"sweep '{spec.name}': {len(done)}/{spec.search.num_samples} configs"
            + (f" ({stopped} stopped early)" if stopped else "") + f", {best}, ETA {eta}")


def print_table(spec: SweepSpec, config_rows: list[dict], top: int = 10) -> None:
    """Console table of the top configs by seed mean (rich), failed configs listed after them."""
    from rich.console import Console
    from rich.table import Table

    metric = spec.rank_metric
    scored = ranked_rows(spec, config_rows)
    unscored = [r for r in config_rows if r not in scored]
    front = " (Pareto front first)" if spec.multi_objective else ""
    table = Table(title=f"sweep '{spec.name}': top configs by cross-validated {metric}{front} ({spec.rank_mode}; "
                        f"mean over {spec.selection.folds} folds x {len(spec.seeds)} seeds)")
    others = [m for m in spec.metrics if m != metric]
    for col in ("#", "trial", "status", "units ok", f"{metric} mean +- std", *others, "params"):
        table.add_column(col)

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    for i, r in enumerate(scored[:top] + unscored, 1):
        std = r[f"{metric}_std"]
        params = ", ".join(f"{k.split('.')[-1]}={r[k]:.3g}" if isinstance(r[k], float) else f"{k.split('.')[-1]}={r[k]}"
                           for k in spec.space)
        status = r["status"] + (" *" if r.get(PARETO) else "")
        table.add_row(str(i), r["trial_id"], status, f"{r['n_units_ok']}/{r['n_units']}",
                      num(r[f"{metric}_mean"]) + ("" if std is None else f" +- {std:.4f}"),
                      *[num(r[f"{m}_mean"]) for m in others],
                      params if r["status"] != "failed" else f"{params}  [{r['error']}]")
    Console(width=200).print(table)


def print_final(spec: SweepSpec, final: dict | None, has_truth: bool) -> None:
    """The honesty check: each refit config's cross-validated score beside its test score."""
    out = spec.sweep_dir / "results" / "final"
    if final is None:
        print(f"sweep '{spec.name}': no config scored, nothing refit", flush=True)
        return
    if not has_truth:
        print(f"no ground truth for the held-out perturbations: predictions in {out}/pred.h5ad, no metrics.json "
              "(set paths.test_h5ad to score them)", flush=True)
        return
    m = spec.rank_metric
    for c in final["configs"]:
        cv, test = c["cv"][m], c["test"][m]
        if test["mean"] is None:
            print(f"refit of trial {c['trial_id']}: every seed failed ({out}/metrics.json)", flush=True)
            continue
        print(f"{'selected' if c['trial_id'] == final['selected'] else 'refit'} trial {c['trial_id']}: {m} "
              f"CV {cv['mean']:.4f} +- {cv['std'] or 0:.4f} ({cv['n']} units) vs test {test['mean']:.4f} "
              f"+- {test['std'] or 0:.4f} ({test['n']} seeds); CV - test = {c['cv_minus_test']:+.4f}", flush=True)
    print(f"final prediction and test metrics: {out}/ (pred.h5ad, metrics.json, config.yaml)", flush=True)


def hparam_metrics(metrics: tuple[str, ...]) -> list[str]:
    """The HParams metric columns: CV mean and std of every metric of the sweep's profile."""
    return [f"cv_mean/{m}" for m in metrics] + [f"cv_std/{m}" for m in metrics] + ["n_units_ok"]


def hparam_values(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """A config's HParams row: numbers stay numbers, categorical choices are their labels (strings),
    so every config has the same type per column."""
    return {k: str(params[k]) if p.type == "categorical" else float(params[k]) for k, p in spec.space.items()}


def write_hparams_experiment(sweep_dir: Path, spec: SweepSpec) -> None:
    """The HParams experiment (columns: the space's keys, metrics: CV mean/std) at the sweep root;
    each config's run adds only its session, so TensorBoard lists every config in one table."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    example = {k: p.labels()[0] if p.type == "categorical" else p.low for k, p in spec.space.items()}
    experiment, _, _ = hparams(hparam_dict=hparam_values(spec, example), metric_dict=dict.fromkeys(hparam_metrics(spec.metrics), 0.0))
    with SummaryWriter(str(sweep_dir)) as writer:
        writer.file_writer.add_summary(experiment)


class TrialBoard:
    """TensorBoard run of one config (its trial dir): per-epoch loss of every unit, each unit's final
    metrics, and the mean/std over units (the CV score) with the config's HParams session."""

    def __init__(self, trial_dir: Path, metrics: tuple[str, ...]) -> None:
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(trial_dir), flush_secs=10)
        self._metrics = metrics

    def epoch(self, unit: tuple[int, int], epoch: int, loss: float) -> None:
        self._writer.add_scalar(f"loss/fold_{unit[0]}_seed_{unit[1]}", loss, epoch)

    def unit_done(self, record: dict) -> None:
        for m in self._metrics:
            if record.get(m) is not None:
                self._writer.add_scalar(f"unit_metrics/{m}/fold_{record['fold']}_seed_{record['seed']}", record[m], 0)

    def close(self) -> None:
        self._writer.close()

    def finish(self, hparams_row: dict[str, Any], stats: dict[str, dict]) -> None:
        """CV mean/std scalars and the HParams session (only when at least one unit scored)."""
        from tensorboardX.summary import hparams

        metrics = self._metrics
        values = {f"cv_mean/{m}": stats[m]["mean"] for m in metrics}
        values.update({f"cv_std/{m}": stats[m]["std"] for m in metrics}, n_units_ok=stats[metrics[0]]["n"])
        if values["n_units_ok"]:
            _, session_start, session_end = hparams(hparam_dict=hparams_row, metric_dict=values)
            self._writer.file_writer.add_summary(session_start)
            for tag, value in values.items():
                if value is not None:
                    self._writer.add_scalar(tag, value, 0)
            self._writer.file_writer.add_summary(session_end)
        self._writer.close()
