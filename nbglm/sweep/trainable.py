"""Sweep trainable: one Ray Tune trial per sampled config; the config's units run inside it.

A config is scored by cross-validation over the training perturbations: one unit per (fold, seed),
trained on the fold's training part and scored on its validation part; Optuna sees only the mean
over all units. The test set is never read here.

Design: each trial is a light coordinator (it reserves only a token of memory, no CPU or GPU) that
submits every (fold, seed) as its own Ray task, a unit (`nbglm.sweep.units.seed_unit`, the multi-seed
runner's too) requesting the spec's `{CPU: c, GPU: g}`. Ray's scheduler then runs the units of all
configs in flight as resources allow: the units of one config run concurrently when there is room,
fractional-GPU units pack onto the same GPUs, and a core or GPU slice freed by one unit goes to the
next queued unit at once, whichever config it belongs to. A placement group per config (one
bundle per seed) was the first design; it forced all seeds of a config to share the cores at once
(3 seeds on 2 cores: 15% more CPU per unit) and left cores idle while configs handed over. A unit
lost with its node is retried by Ray on another node.

Why not one trial per (config, seed) grouped by Tune's `Repeater`: the Repeater keeps the grouping
in searcher memory and has no working save/restore (ray-project/ray#11918, open), so after a driver
crash a resumed sweep loses or re-runs seed groups, and a partial group could reach the searcher as
a config's score. With one trial per config, Tune's own trial state is the unit of resume and of
`max_failures`, and the searcher only ever sees the mean over units, reported once at the end. Each
finished unit's record is written straight into the trial directory, so a retried or resumed trial
reruns only the units that had not finished.

Live progress: while the units train, the trainable forwards their per-epoch losses to TensorBoard
and, at most once a second, to `tune.report` with the metric keys present but NaN (Tune's strict
metric check wants them in every result); the driver's `FinalOnlyOptunaSearch` ignores those
intermediate results, so Optuna is told only the final cross-validated mean.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nbglm import atomic
from nbglm.config import from_dict
from nbglm.sweep.aggregate import TrialBoard, hparam_values, read_record, record_path
from nbglm.sweep.space import SweepSpec
from nbglm.sweep.units import UnitPool, unit_stats

REPORT_EVERY_S = 1.0
# Seed units are scheduled by Ray outside the trial's own placement group (which holds no CPU).
OUTSIDE_TRIAL = PlacementGroupSchedulingStrategy(placement_group=None)
# What a trial reserves: Tune needs a non-empty request; the coordinator itself needs no CPU.
TRIAL_RESOURCES = [{"memory": 1}]


@dataclass
class SweepContext:
    """What every trial of one sweep shares; `tune.with_parameters` stores it once.

    `store` hands out each fold's dataset and DE cache as object refs (built once per data config):
    passed on as task arguments they reach each unit straight from the object store.
    """

    spec: SweepSpec
    base: dict  # resolved base experiment config
    sweep_dir: str
    cpu: float  # per unit, after the no-GPU fallback
    gpu: float
    store: Any  # FoldStore actor handle
    faults: dict  # injected by tests through NBGLM_TEST_FAULTS; {} in real sweeps


def trial_dirname(trial: Any) -> str:
    """Short trial directory names (Tune's default embeds every parameter)."""
    return f"config_{trial.trial_id}"


def _next_attempt(trial_dir: Path) -> int:
    """Count this start of the trial (first run, `max_failures` retry or resume) in the trial dir."""
    path = trial_dir / "attempts"
    attempt = (int(path.read_text()) if path.is_file() else 0) + 1
    atomic.write_text(path, str(attempt))
    return attempt


Unit = tuple[int, int]  # (fold, seed)


def _result(records: dict[Unit, dict], latest: dict[Unit, tuple[int, float]], final: bool,
            metrics: tuple[str, ...]) -> dict[str, Any]:
    """One `tune.report` payload; the same keys every time so CSV/JSON logs stay rectangular."""
    stats = unit_stats(list(records.values()), metrics) if final else None
    losses = [loss for _, loss in latest.values()]
    out: dict[str, Any] = {  # progress first: Tune's console table shows the leading keys
        "epoch": max((e for e, _ in latest.values()), default=-1),
        "loss": sum(losses) / len(losses) if losses else math.nan,
        "n_units_done": len(records),
        "n_units_ok": sum(r["status"] == "ok" for r in records.values()),
    }
    for m in metrics:
        out[m] = stats[m]["mean"] if stats and stats[m]["mean"] is not None else math.nan
        out[f"{m}_std"] = stats[m]["std"] if stats and stats[m]["std"] is not None else math.nan
    out["final"] = final
    return out


def train_config(config: dict[str, Any], ctx: SweepContext) -> None:
    """Tune function trainable for one sampled config: run its units, stream progress, report the mean."""
    spec = ctx.spec
    trial_dir = Path(ctx.sweep_dir) / Path(tune.get_context().get_trial_dir()).name
    cfg = from_dict(spec.experiment_dict(config, ctx.base))
    attempt = _next_attempt(trial_dir)
    if ctx.faults.get("fail_first_attempt") and attempt == 1:
        raise RuntimeError("injected crash of the trial's first attempt (NBGLM_TEST_FAULTS)")
    units = spec.units()
    records = {u: r for u in units if (r := read_record(trial_dir, *u)) and r["status"] == "ok"}
    board = TrialBoard(trial_dir, spec.metrics)
    pool = UnitPool(ctx.cpu, ctx.gpu, ctx.faults, OUTSIDE_TRIAL)
    folds = ray.get(ctx.store.refs.remote(cfg))
    for fold, seed in units:
        if (fold, seed) not in records:
            data_ref, cache_ref = folds[fold]
            pool.submit(cfg, seed, fold, data_ref, cache_ref, trial_dir / f"fold_{fold}" / f"seed_{seed}")
    latest: dict[Unit, tuple[int, float]] = {}
    last_report = time.monotonic()
    while len(pool):
        for event in pool.poll(timeout=REPORT_EVERY_S):
            if event[0] == "epoch":
                _, unit, epoch, metrics = event
                latest[unit] = (epoch, float(metrics["loss"]))
                board.epoch(unit, epoch, float(metrics["loss"]))
            else:
                record = records[event[1]] = event[2]
                atomic.write_json(record_path(trial_dir, *event[1]), record)
                board.unit_done(record)
        if latest and time.monotonic() - last_report >= REPORT_EVERY_S:
            tune.report(_result(records, latest, False, spec.metrics))
            last_report = time.monotonic()
    ordered = [records[u] for u in units]
    board.finish(hparam_values(spec, config), unit_stats(ordered, spec.metrics))
    if not any(r["status"] == "ok" for r in ordered):
        first = ordered[0]
        raise RuntimeError(f"all {len(ordered)} units failed; fold {first['fold']} seed {first['seed']}: "
                           f"{first['error']}")
    tune.report(_result(records, latest, True, spec.metrics))
