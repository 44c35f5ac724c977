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

Progress and early stopping: the trainable reports once per epoch that every unit has passed
(`epoch`), with means over the units of the training loss, of the validation NB NLL (`val_nll`: each
unit's NLL of its fold's validation pseudobulks; never the test set) and of each unit's lowest
`val_nll` so far (`val_nll_best`, what ASHA reads: `nbglm.sweep.units.ASHA_SIGNAL`), and the metric
keys present but NaN (Tune's strict metric check wants them in every result). The driver's searcher
ignores these intermediate results, so Optuna is told only the final cross-validated mean, or that
the trial was pruned. When the scheduler stops a trial, Tune raises SystemExit inside `tune.report`:
the trainable records each unfinished unit as `stopped` and cancels it; the unit stops at its next
epoch end and rewrites its record with the epochs it trained.
"""

from __future__ import annotations

import math
import statistics
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
from nbglm.sweep.folds import data_key
from nbglm.sweep.space import SweepSpec
from nbglm.sweep.units import ASHA_SIGNAL, VAL_SIGNAL, UnitPool, unit_record, unit_stats

POLL_S = 1.0
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
    store: Any  # FoldStore actor handle: the folds of data configs other than the base one
    base_key: str  # data_key of the base config
    base_folds: list  # [(dataset ref, cache ref)] per fold of the base data config, owned by the driver
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


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _result(epoch: int, histories: dict[Unit, list[dict]], records: dict[Unit, dict],
            final: bool, metrics: tuple[str, ...]) -> dict[str, Any]:
    """One `tune.report` payload at `epoch` (passed by every unit); the same keys every time so the
    CSV/JSON logs stay rectangular. `histories`: each unit's per-epoch {'loss', VAL_SIGNAL}."""
    stats = unit_stats(list(records.values()), metrics) if final else None
    at = [h[epoch - 1] for h in histories.values() if len(h) >= epoch]
    best = [min((e[VAL_SIGNAL] for e in h[:epoch] if e.get(VAL_SIGNAL) is not None), default=None)
            for h in histories.values()]
    out: dict[str, Any] = {  # progress first: Tune's console table shows the leading keys
        "epoch": epoch,
        "loss": _mean([e["loss"] for e in at]),
        VAL_SIGNAL: _mean([e.get(VAL_SIGNAL) for e in at]),
        ASHA_SIGNAL: _mean(best),
        "n_units_done": len(records),
        "n_units_ok": sum(r["status"] == "ok" for r in records.values()),
    }
    for m in metrics:
        out[m] = stats[m]["mean"] if stats and stats[m]["mean"] is not None else math.nan
        out[f"{m}_std"] = stats[m]["std"] if stats and stats[m]["std"] is not None else math.nan
    out["final"] = final
    return out


def train_config(config: dict[str, Any], ctx: SweepContext) -> None:
    """Tune function trainable for one sampled config: run its units, report each epoch all of them
    passed, then the cross-validated mean; on an early stop, cancel the units and record them."""
    spec = ctx.spec
    trial_dir = Path(ctx.sweep_dir) / Path(tune.get_context().get_trial_dir()).name
    cfg = from_dict(spec.experiment_dict(config, ctx.base))
    attempt = _next_attempt(trial_dir)
    if ctx.faults.get("fail_first_attempt") and attempt == 1:
        raise RuntimeError("injected crash of the trial's first attempt (NBGLM_TEST_FAULTS)")
    units = spec.units()
    epochs = cfg.train.epochs
    records = {u: r for u in units if (r := read_record(trial_dir, *u)) and r["status"] == "ok"}
    histories: dict[Unit, list[dict]] = {u: list(records[u].get("history") or []) if u in records else []
                                         for u in units}
    board = TrialBoard(trial_dir, spec.metrics)
    pool = UnitPool(ctx.cpu, ctx.gpu, ctx.faults, OUTSIDE_TRIAL)
    folds = ctx.base_folds if data_key(cfg) == ctx.base_key else ray.get(ctx.store.refs.remote(cfg))
    for fold, seed in units:
        if (fold, seed) not in records:
            data_ref, cache_ref = folds[fold]
            pool.submit(cfg, seed, fold, data_ref, cache_ref, trial_dir / f"fold_{fold}" / f"seed_{seed}",
                        record_path(trial_dir, fold, seed))

    def take(events: list[tuple]) -> None:
        for event in events:
            if event[0] == "epoch":
                _, unit, epoch, metrics = event
                histories[unit].append({"epoch": epoch, "loss": float(metrics["loss"]),
                                        VAL_SIGNAL: metrics.get(VAL_SIGNAL), "t": metrics["t"]})
                board.epoch(unit, epoch, float(metrics["loss"]))
            else:
                record = records[event[1]] = event[2]
                atomic.write_json(record_path(trial_dir, *event[1]), record)
                board.unit_done(record)

    reported = 0
    try:
        while len(pool):
            take(pool.poll(timeout=POLL_S))
            # a finished unit (failed ones too) has passed every epoch; the others the ones they trained
            passed = min(epochs if u in records else len(histories[u]) for u in units)
            while reported < min(passed, epochs - 1):  # the last epoch is reported with the final result
                reported += 1
                tune.report(_result(reported, histories, records, False, spec.metrics))
    except SystemExit:  # the scheduler stopped this config: Tune ends the trial inside tune.report
        while events := pool.poll(timeout=0):  # what the units sent meanwhile: epochs, units that finished
            take(events)
        for unit in pool.live():  # provisional records; each cancelled unit overwrites its own when it stops
            record = unit_record(unit[1], unit[0], spec.metrics, status="stopped", epochs_done=len(histories[unit]),
                                 history=histories[unit], end=time.time())
            atomic.write_json(record_path(trial_dir, *unit), record)
        pool.cancel()
        board.close()
        raise
    ordered = [records[u] for u in units]
    board.finish(hparam_values(spec, config), unit_stats(ordered, spec.metrics))
    if not any(r["status"] == "ok" for r in ordered):
        first = ordered[0]
        raise RuntimeError(f"all {len(ordered)} units failed; fold {first['fold']} seed {first['seed']}: "
                           f"{first['error']}")
    tune.report(_result(epochs, histories, records, True, spec.metrics))
