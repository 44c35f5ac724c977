"""Sweep export and TensorBoard: what a user reads during and after a sweep.

Everything here is rebuilt from files, so it is exact mid-sweep and after a resume: each seed unit's
record (`<trial dir>/seeds/seed_{s}.json`, written by the trainable when the seed finishes) plus the
trial list Tune keeps. Outputs under `<sweep dir>/results/`: `trials.csv` (one row per config x
seed), `configs.csv` (one row per config with seed statistics), `best_config.yaml` (a runnable
experiment config) — and a console table of the top configs.
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
from nbglm.sweep.units import METRICS, seed_stats, unit_record
from nbglm.sweep.space import SweepSpec

_DONE = {"TERMINATED", "ERROR"}


@dataclass
class TrialInfo:
    """What the export needs from one Tune trial (one sampled config)."""

    trial_id: str
    dirname: str  # the trial's directory name under the sweep dir
    params: dict[str, Any]  # searcher values (list choices as their labels)
    status: str  # Tune status: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    error: str | None = None  # one line, for a trial that ended in ERROR


def record_path(trial_dir: Path, seed: int) -> Path:
    return trial_dir / "seeds" / f"seed_{seed}.json"


def read_record(trial_dir: Path, seed: int) -> dict | None:
    path = record_path(trial_dir, seed)
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
        for seed in spec.seeds:
            rec = read_record(sweep_dir / t.dirname, seed)
            if rec is None:  # not run yet, or the trial died before this seed finished
                rec = unit_record(seed, status="failed" if t.status == "ERROR" else t.status.lower(),
                                  error=t.error if t.status == "ERROR" else None)
            records.append(rec)
            trial_rows.append({
                "trial_id": t.trial_id, **params, "seed": seed, "status": rec["status"],
                **{m: rec.get(m) for m in METRICS}, "wall_s": rec.get("wall_s"), "cpu_s": rec.get("cpu_s"),
                "node_id": rec.get("node_id"),
                "gpu_ids": " ".join(rec.get("gpu_ids") or []), "start": rec.get("start"), "end": rec.get("end"),
                "error": rec.get("error"),
            })
        n_ok = sum(r["status"] == "ok" for r in records)
        status = ("ok" if n_ok == len(records) else "partial" if n_ok and done
                  else "failed" if done else t.status.lower())
        error = next((r["error"] for r in records if r.get("error")), t.error) if status != "ok" else None
        stats = seed_stats(records)
        config_rows.append({
            "trial_id": t.trial_id, **params, "status": status, "n_seeds_ok": n_ok, "n_seeds": len(records),
            **{f"{m}_{s}": stats[m][s] for m in METRICS for s in ("mean", "std", "min", "max")},
            "error": error,
        })
    return trial_rows, config_rows


def best_row(spec: SweepSpec, config_rows: list[dict]) -> dict | None:
    """The config with the best seed mean of the spec's metric (over configs with an ok seed)."""
    scored = [r for r in config_rows if r[f"{spec.metric}_mean"] is not None]
    if not scored:
        return None
    sign = 1 if spec.mode == "max" else -1
    return max(scored, key=lambda r: sign * r[f"{spec.metric}_mean"])


def export(sweep_dir: Path, spec: SweepSpec, base: dict, trials: list[TrialInfo]) -> list[dict]:
    """Write results/trials.csv, configs.csv and best_config.yaml; return the config rows."""
    out = sweep_dir / "results"
    trial_rows, config_rows = collect(sweep_dir, spec, trials)
    _write_csv(out / "trials.csv", trial_rows)
    _write_csv(out / "configs.csv", config_rows)
    best = best_row(spec, config_rows)
    if best is not None:
        cfg = from_dict(spec.experiment_dict({k: best[k] for k in spec.space}, base))
        mean, std = best[f"{spec.metric}_mean"], best[f"{spec.metric}_std"]
        header = (f"# Best config of sweep '{spec.name}' (trial {best['trial_id']}): {spec.metric} "
                  f"mean {mean:.4f}" + (f" +- {std:.4f}" if std is not None else "")
                  + f" over {best['n_seeds_ok']} seed(s).\n# Run it: nbglm run --config {out / 'best_config.yaml'}\n")
        atomic.write_text(out / "best_config.yaml", header + to_yaml(cfg))
    return config_rows


def print_table(spec: SweepSpec, config_rows: list[dict], top: int = 10) -> None:
    """Console table of the top configs by seed mean (rich), failed configs listed after them."""
    from rich.console import Console
    from rich.table import Table

    sign = 1 if spec.mode == "max" else -1
    scored = sorted((r for r in config_rows if r[f"{spec.metric}_mean"] is not None),
                    key=lambda r: -sign * r[f"{spec.metric}_mean"])
    failed = [r for r in config_rows if r[f"{spec.metric}_mean"] is None]
    table = Table(title=f"sweep '{spec.name}': top configs by seed-mean {spec.metric} ({spec.mode})")
    others = [m for m in METRICS if m != spec.metric]
    for col in ("#", "trial", "status", "seeds ok", f"{spec.metric} mean +- std", *others, "params"):
        table.add_column(col)

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    for i, r in enumerate(scored[:top] + failed, 1):
        std = r[f"{spec.metric}_std"]
        params = ", ".join(f"{k.split('.')[-1]}={r[k]:.3g}" if isinstance(r[k], float) else f"{k.split('.')[-1]}={r[k]}"
                           for k in spec.space)
        table.add_row(str(i), r["trial_id"], r["status"], f"{r['n_seeds_ok']}/{r['n_seeds']}",
                      num(r[f"{spec.metric}_mean"]) + ("" if std is None else f" +- {std:.4f}"),
                      *[num(r[f"{m}_mean"]) for m in METRICS if m != spec.metric],
                      params if r["status"] != "failed" else f"{params}  [{r['error']}]")
    Console(width=200).print(table)


HPARAM_METRICS = [f"seed_mean/{m}" for m in METRICS] + [f"seed_std/{m}" for m in METRICS] + ["n_seeds_ok"]


def hparam_values(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """A config's HParams row: numbers stay numbers, categorical choices are their labels (strings),
    so every config has the same type per column."""
    return {k: str(params[k]) if p.type == "categorical" else float(params[k]) for k, p in spec.space.items()}


def write_hparams_experiment(sweep_dir: Path, spec: SweepSpec) -> None:
    """The HParams experiment (columns: the space's keys, metrics: seed mean/std) at the sweep root;
    each config's run adds only its session, so TensorBoard lists every config in one table."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    example = {k: p.labels()[0] if p.type == "categorical" else p.low for k, p in spec.space.items()}
    experiment, _, _ = hparams(hparam_dict=hparam_values(spec, example), metric_dict=dict.fromkeys(HPARAM_METRICS, 0.0))
    with SummaryWriter(str(sweep_dir)) as writer:
        writer.file_writer.add_summary(experiment)


class TrialBoard:
    """TensorBoard run of one config (its trial dir): per-epoch loss of every seed, each seed's final
    metrics, and the seed mean/std with the config's HParams session."""

    def __init__(self, trial_dir: Path) -> None:
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(trial_dir), flush_secs=10)

    def epoch(self, seed: int, epoch: int, loss: float) -> None:
        self._writer.add_scalar(f"loss/seed_{seed}", loss, epoch)

    def seed_done(self, record: dict) -> None:
        for m in METRICS:
            if record.get(m) is not None:
                self._writer.add_scalar(f"seed_metrics/{m}/seed_{record['seed']}", record[m], 0)

    def finish(self, hparams_row: dict[str, Any], stats: dict[str, dict]) -> None:
        """Seed mean/std scalars and the HParams session (only when at least one seed scored)."""
        from tensorboardX.summary import hparams

        values = {f"seed_mean/{m}": stats[m]["mean"] for m in METRICS}
        values.update({f"seed_std/{m}": stats[m]["std"] for m in METRICS}, n_seeds_ok=stats["overall_score"]["n"])
        if values["n_seeds_ok"]:
            _, session_start, session_end = hparams(hparam_dict=hparams_row, metric_dict=values)
            self._writer.file_writer.add_summary(session_start)
            for tag, value in values.items():
                if value is not None:
                    self._writer.add_scalar(tag, value, 0)
            self._writer.file_writer.add_summary(session_end)
        self._writer.close()
