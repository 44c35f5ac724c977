"""Sweep driver behind `nbglm sweep SPEC` (and `python launch.py SPEC`): `run_sweep`.

The spec is validated, the training data read and the cross-validation folds assigned (`folds.csv`)
before Ray starts; each fold's dataset and ground-truth cache go into the object store once per data
config (`nbglm.sweep.folds`). When the search ends, the best configs are refit on all training
perturbations and predict the held-out list (`nbglm.sweep.refit`): the only time the test set is read. Results land in `<storage_path>/<name>/` (printed at start and end):
Tune's experiment state and one directory per config (its seeds' sub-bundles, records and
TensorBoard events), plus `results/` rewritten after every finished config.

`--resume` continues a sweep whose driver died: `Tuner.restore` brings back the trials and the
searcher on its Optuna study (`optuna.db`), finished configs are kept, unfinished ones rerun only
their unfinished seeds, and the searcher samples the remaining configs. The experiment state is
saved every second, so at most a config started within that second of a crash is sampled afresh
(its directory moves to orphaned/, its Optuna trial is marked FAIL). How the search itself works
(sampler, warm start, persistent study, ASHA) is in `nbglm.sweep.search`.

The driver prints one line per finished config (`k/N configs`, the best so far, an ETA), terminal
or not, so a batch job's log shows how far the sweep is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search import ConcurrencyLimiter
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from nbglm import atomic
from nbglm.config import from_dict, to_dict
from nbglm.errors import NbglmError
from nbglm.data.folds import assign_folds
from nbglm.data.load import check_inputs, read_inputs
from nbglm.sweep.aggregate import (TrialInfo, export, print_final, print_table, progress_line,
                                  write_hparams_experiment)
from nbglm.sweep.cluster import (CONNECT_TIMEOUT_S, check_address, check_shared_storage, environ, ray_session,
                                 unit_resources)
from nbglm.sweep.folds import FoldStore, build_fold, data_key
from nbglm.pipeline import check_sizes
from nbglm.sweep.refit import refit
from nbglm.sweep.search import SweepASHA, make_searcher, tracker_callbacks
from nbglm.sweep.space import SweepSpec, load_spec, warm_start_rows
from nbglm.sweep.trainable import TRIAL_RESOURCES, SweepContext, train_config, trial_dirname
from nbglm.sweep.units import injected_faults

SAVED_SPEC = "sweep.yaml"
FOLDS = "folds.csv"


@dataclass
class SweepResult:
    name: str
    sweep_dir: Path
    rows: list[dict]  # results/configs.csv
    final: dict | None  # results/final/metrics.json's content; None before the refit or without ground truth


def _first_difference(a: Any, b: Any, key: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(dict.fromkeys([*a, *b])):
            diff = _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
            if diff:
                return diff
        return None
    return key or "<root>" if a != b else None


def _check_directory(spec: SweepSpec, base: dict, resume: bool) -> None:
    """A new sweep must not overwrite an old one; a resumed one must be the same sweep."""
    sweep_dir = spec.sweep_dir
    saved = sweep_dir / SAVED_SPEC
    has_state = tune.Tuner.can_restore(str(sweep_dir)) if sweep_dir.is_dir() else False
    if not resume:
        if has_state:
            raise NbglmError(f"{sweep_dir} already holds a sweep: pass --resume to continue it, or pick "
                             "another --set name=... / storage_path")
        return
    if not has_state:
        raise NbglmError(f"nothing to resume in {sweep_dir} (no Tune experiment state); run without --resume")
    if sweep_dir.stat().st_mode & 0o022:  # --resume unpickles Tune's state: whoever can write it runs code here
        raise NbglmError(f"refusing to resume from {sweep_dir}: it is writable by group or others, and resuming "
                         f"loads Tune's pickled state from it; `chmod go-w {sweep_dir}` if you trust its content")
    if saved.is_file():
        old = yaml.safe_load(saved.read_text())
        diff = _first_difference(old, {"spec": spec.raw, "base_config": base})
        if diff:
            raise NbglmError(f"the spec differs from the one {sweep_dir} was started with (at '{diff}'); "
                             "resume with the same spec and --set values")


def _last_line(text: str | None) -> str | None:
    """The exception line of a traceback text (what a results table shows)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None


def _trial_error(trial: Any) -> str | None:
    path = trial.error_file
    return _last_line(Path(path).read_text()) if path and Path(path).is_file() else None


def _status(trial: Any, ending: Any = None) -> str:
    """Tune's status, or STOPPED for a trial the scheduler ended before its final result. `ending`:
    the trial a callback is told has completed, still RUNNING while Tune runs the callbacks."""
    if trial is ending and trial.status == "RUNNING":
        return "TERMINATED" if (trial.last_result or {}).get("final") else "STOPPED"
    if trial.status == "TERMINATED" and not (trial.last_result or {}).get("final"):
        return "STOPPED"
    return trial.status


class ExportCallback(tune.Callback):
    """Rewrite results/ whenever a config finishes, so the export is readable mid-sweep, and print
    the progress line."""

    def __init__(self, spec: SweepSpec, base: dict, slots: int) -> None:
        self.spec, self.base, self.slots = spec, base, slots

    def _export(self, trials: list, ending: Any = None) -> list[dict]:
        infos = [TrialInfo(t.trial_id, Path(t.path).name, dict(t.config), _status(t, ending),
                           _trial_error(t) if t.status == "ERROR" else None) for t in trials]
        return export(self.spec.sweep_dir, self.spec, self.base, infos)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(progress_line(self.spec, self._export(trials, trial), self.slots), flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(progress_line(self.spec, self._export(trials), self.slots), flush=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Also move aside the directory of a config the driver started in the last second before
        a crash: the restored state never knew it, so the searcher sampled a new one instead."""
        sweep_dir = self.spec.sweep_dir
        known = {Path(t.path).name for t in trials}
        for orphan in [d for d in sweep_dir.glob("config_*") if d.name not in known]:
            (sweep_dir / "orphaned").mkdir(exist_ok=True)
            orphan.rename(sweep_dir / "orphaned" / orphan.name)
        self._export(trials)


def run_sweep(spec_path: str | Path, *, address: str | None = None, resume: bool = False,
              sets: list[str] | tuple[str, ...] = (), connect_timeout: float = CONNECT_TIMEOUT_S) -> SweepResult:
    """Run (or resume) the sweep of `spec_path`; its export is in `<sweep_dir>/results/`."""
    spec = load_spec(spec_path, sets)
    base_cfg = spec.resolve_base()
    base = to_dict(base_cfg)
    sweep_dir = spec.sweep_dir
    print(f"sweep '{spec.name}': results in {sweep_dir}", flush=True)

    _check_directory(spec, base, resume)
    if address:
        check_address(address, connect_timeout)  # before the data is read: a wrong address costs seconds
    warm_rows = warm_start_rows(spec) if spec.search.warm_start and not resume else []
    inputs = read_inputs(base_cfg, on_disk=True)  # checked here; the counts stay in their files
    check_inputs(base_cfg, inputs)  # a held-out list that overlaps training is one line now, not after the search
    pert_col, control = base_cfg.data.pert_name_col, base_cfg.data.control_name
    folds_csv = sweep_dir / FOLDS
    folds = (pd.read_csv(folds_csv, dtype={"label": str}) if resume and folds_csv.is_file()
             else assign_folds(inputs, pert_col, control, spec.selection.folds, spec.selection.seed))
    base_folds = [build_fold(base_cfg, inputs, folds, f) for f in range(spec.selection.folds)]  # bad data: here
    _check_sizes(spec, base, base_folds[0][0])
    faults = injected_faults()
    with ray_session(address, units=spec.max_concurrent * len(spec.units()), timeout=connect_timeout):
        cpu, gpu = unit_resources(spec.resources.cpu, spec.resources.gpu)
        slots = _unit_slots(spec, cpu, gpu)
        check_shared_storage(sweep_dir)
        # The base data config's folds are the driver's own objects: they outlive any worker node. The
        # store builds the folds of other data configs; it lives beside the driver and restarts if it must.
        base_refs = [(ray.put(d), ray.put(c)) for d, c in base_folds]
        del base_folds
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        store = FoldStore.options(scheduling_strategy=here, max_restarts=-1, max_task_retries=-1).remote(
            replace(inputs, test=None, test_x=None), folds)  # the test set stays here
        ctx = SweepContext(spec=spec, base=base, sweep_dir=str(sweep_dir), cpu=cpu, gpu=gpu, store=store,
                           base_key=data_key(base_cfg), base_folds=base_refs,
                           faults=faults)
        trainable = tune.with_resources(tune.with_parameters(train_config, ctx=ctx),
                                        tune.PlacementGroupFactory(TRIAL_RESOURCES))
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # Tune's table reports the trials
            sweep_dir.mkdir(parents=True, exist_ok=True)
            searcher = make_searcher(spec)
            if warm_rows:
                added = searcher.add_finished(spec, warm_rows, Path(str(spec.search.warm_start)))
                print(f"sweep '{spec.name}': warm start with {added} finished config(s) of {spec.search.warm_start}",
                      flush=True)
            scheduler = SweepASHA(spec, base_cfg.train.epochs) if spec.early_stopping else None
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent),
                                            scheduler=scheduler, num_samples=spec.search.num_samples,
                                            reuse_actors=True, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=spec.name, storage_path=str(sweep_dir.parent),
                    failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                    callbacks=[ExportCallback(spec, base, slots), CSVLoggerCallback(), JsonLoggerCallback(),
                               *tracker_callbacks(spec)],
                ),
            )
            atomic.write_text(sweep_dir / SAVED_SPEC,
                              yaml.safe_dump({"spec": spec.raw, "base_config": base}, sort_keys=False))
            atomic.write_text(folds_csv, folds.to_csv(index=False))
            write_hparams_experiment(sweep_dir, spec)
        # save the experiment state every second (resume loses at most that); no automatic TensorBoard
        # logger (TrialBoard writes one that shows units and CV means, which Tune's per-trial one cannot)
        with environ(TUNE_GLOBAL_CHECKPOINT_S="1", TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):
            grid = tuner.fit()
        rows = _final_export(spec, base, grid)
        print_table(spec, rows)
        final = None
        interrupted = [r for r in grid if not r.error and not r.metrics.get("done")]
        if not interrupted and len(grid) == spec.search.num_samples:
            final = refit(spec, base, rows, inputs, cpu=cpu, gpu=gpu, faults=faults)
            print_final(spec, final, inputs.test is not None)
        else:
            print(f"sweep '{spec.name}' is unfinished: no refit yet; continue with --resume", flush=True)
    return SweepResult(spec.name, sweep_dir, rows, final if inputs.test is not None else None)


def _check_sizes(spec: SweepSpec, base: dict, data: Any) -> None:
    """The base config and each end of every search range must fit in memory on the fold data."""
    points = [{}] + [{key: v} for key, p in spec.space.items()
                     for v in (p.labels() if p.type == "categorical" else [p.low, p.high])]
    for point in points:
        try:
            check_sizes(from_dict(spec.experiment_dict(point, base)), data)
        except NbglmError as exc:
            where = f"search.space['{next(iter(point))}'] = {next(iter(point.values()))!r}: " if point else ""
            raise NbglmError(f"{where}{exc}") from None


def _final_export(spec: SweepSpec, base: dict, grid: Any) -> list[dict]:
    """The export from the final ResultGrid (what the callback last wrote, plus the rows); a trial
    without its final report was interrupted (Ctrl-C) and is left for --resume."""
    infos = [TrialInfo(Path(r.path).name.removeprefix("config_"), Path(r.path).name, dict(r.config),
                       "ERROR" if r.error else "TERMINATED" if r.metrics.get("final")
                       else "STOPPED" if r.metrics.get("done") else "UNFINISHED",
                       _last_line(str(r.error)) if r.error else None)
             for r in grid]
    return export(spec.sweep_dir, spec, base, infos)


def _unit_slots(spec: SweepSpec, cpu: float, gpu: float) -> int:
    """How many units the sweep runs at once: its own limit, or what the cluster's CPUs/GPUs hold."""
    total = ray.cluster_resources()
    fits = [spec.max_concurrent * len(spec.units()), int(total.get("CPU", 1) // cpu)]
    if gpu:
        fits.append(int(total.get("GPU", 0) // gpu))
    return max(1, min(fits))
