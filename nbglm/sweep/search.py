"""How a sweep searches: the Optuna searcher and its persistent study, the sampler, warm start, and
ASHA early stopping. The driver (`nbglm.sweep.runner`) assembles them; nothing here reads a test set.

The study lives in `<sweep dir>/optuna.db` (SQLite, study name = the sweep's name), so
`optuna.load_study` and optuna-dashboard see it during and after the sweep, and a resumed sweep
goes on writing to it. Each Optuna trial carries its Tune trial id (user attribute `tune_trial_id`).

Resume: Tune restores the searcher from its own checkpoint (saved every second), which may lag the
database by up to that second. A trial told twice is told once (`skip_if_finished`); a trial asked
for in the lost second is marked FAIL, because the resumed sweep samples a new config in its place.
The ASHA scheduler is not in Tune's checkpoint at all, so `SweepASHA` keeps its rungs and the
configs it stopped in `<sweep dir>/asha.pkl`, written on every decision.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from nbglm import atomic
from nbglm.sweep.params import Param
from nbglm.sweep.space import SweepSpec
from nbglm.sweep.units import ASHA_SIGNAL

STUDY_DB = "optuna.db"
MLFLOW_DB = "mlflow.db"  # the MLflow callback's local store (SQLite: MLflow 3 refuses new file stores)
ASHA_STATE = "asha.pkl"
TUNE_TRIAL_ID = "tune_trial_id"  # Optuna user attribute: the Tune trial (config_<id> directory)


def study_storage(sweep_dir: Path) -> str:
    """The study's storage URL, for `optuna.load_study(study_name=<sweep name>, storage=...)`."""
    return f"sqlite:///{sweep_dir / STUDY_DB}"


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler, its random start-up sized to the budget (`SearchSettings.startup_trials`)."""
    s = spec.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.startup_trials())
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=s.startup_trials())
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials())


class SweepSearch(OptunaSearch):
    """OptunaSearch that learns only from a trial's final result (the cross-validated mean).

    Intermediate results carry training progress and the early-stopping signal with NaN metrics;
    Optuna has no use for them (ASHA, not an Optuna pruner, stops configs). A trial that ends without
    its final result was stopped early and is told PRUNED, never a made-up score; one that crashed
    is told FAIL.
    """

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [(result or {}).get(m) for m in metrics]
        final = bool(result and result.get("final")) and all(v is not None and math.isfinite(v) for v in values)
        if final:
            state, told = TrialState.COMPLETE, values if isinstance(self.metric, list) else values[0]
        else:
            state, told = (TrialState.FAIL if error or (result and result.get("final")) else TrialState.PRUNED), None
        self._ot_study.tell(self._ot_trials[trial_id], told, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's searcher state, then FAIL for the trials asked for after it was saved (see module doc)."""
        super().restore(checkpoint_path)
        known = {t.number for t in self._ot_trials.values()}
        for lost in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if lost.number not in known:
                self._ot_study.tell(lost.number, state=TrialState.FAIL, skip_if_finished=True)

    def add_finished(self, spec: SweepSpec, rows: list[dict[str, str]], source: Path) -> int:
        """Warm start: add an earlier sweep's finished configs (configs.csv rows, cross-validated
        means) to the study as complete trials, before anything is sampled; returns how many."""
        trials = []
        for row in rows:
            values = [row.get(f"{m}_mean") for m, _ in spec.objectives]
            if any(v in (None, "") for v in values):
                continue
            trials.append(optuna.trial.create_trial(
                params={k: _param_value(p, row[k]) for k, p in spec.space.items()},
                distributions=spec.optuna_space(),
                values=[float(v) for v in values],
                user_attrs={"warm_start": str(source), "warm_start_trial_id": row["trial_id"]},
            ))
        self._ot_study.add_trials(trials)
        return len(trials)


def _param_value(param: Param, text: str) -> Any:
    """A configs.csv cell back to what the searcher suggested (int, float, or a choice label)."""
    if param.type == "int":
        return int(float(text))
    if param.type == "float":
        return float(text)
    return next(label for label in param.labels() if str(label) == text)


def make_searcher(spec: SweepSpec) -> SweepSearch:
    """The spec's searcher on its persistent study (created here; a resume restores it instead)."""
    metrics = [m for m, _ in spec.objectives]
    modes = [mode for _, mode in spec.objectives]
    storage = optuna.storages.RDBStorage(study_storage(spec.sweep_dir))
    return SweepSearch(spec.optuna_space(), metric=metrics if spec.multi_objective else metrics[0],
                       mode=modes if spec.multi_objective else modes[0], sampler=make_sampler(spec),
                       study_name=spec.name, storage=storage)


class SweepASHA(ASHAScheduler):
    """ASHA over the per-epoch validation signal whose state survives a driver crash (module doc).

    A config it stopped stays stopped when its trial is rerun after a crash: the rerun reaches the
    same epoch and is stopped there again, whatever the rungs hold by then.
    """

    def __init__(self, spec: SweepSpec, epochs: int) -> None:
        es = spec.early_stopping
        assert es is not None
        super().__init__(time_attr="epoch", metric=ASHA_SIGNAL, mode="min", max_t=epochs,
                         grace_period=es.min_epochs, reduction_factor=es.reduction_factor, brackets=1,
                         stop_last_trials=False)
        self._state_path = str(spec.sweep_dir / ASHA_STATE)
        self._stopped_at: dict[str, int] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self._state_path)
        if path.is_file():
            self.__dict__.update(pickle.loads(path.read_bytes()))

    def _save(self) -> None:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_state_path", "_loaded")}
        atomic.write_bytes(self._state_path, lambda f: pickle.dump(state, f))

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        if trial.trial_id not in self._trial_info:  # a restored trial keeps its bracket
            super().on_trial_add(tune_controller, trial)
            self._save()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load()
        stopped = self._stopped_at.get(trial.trial_id)
        if stopped is not None and result.get(self._time_attr, 0) >= stopped:
            return TrialScheduler.STOP
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self._stopped_at[trial.trial_id] = result[self._time_attr]
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load()
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)
            self._trial_info.pop(trial.trial_id, None)
            self._save()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        if self._trial_info.pop(trial.trial_id, None) is not None:
            self._save()


def tracker_callbacks(spec: SweepSpec) -> list[Any]:
    """The spec's experiment trackers as Tune callbacks: `mlflow` logs every config (its params, each
    reported epoch and the final CV means) as one MLflow run in a local store in the sweep dir,
    experiment = the sweep's name (`mlflow ui --backend-store-uri sqlite:///<sweep dir>/mlflow.db`)."""
    out = []
    if "mlflow" in spec.callbacks:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(tracking_uri=mlflow_store(spec.sweep_dir), experiment_name=spec.name,
                                        save_artifact=False))
    return out


def mlflow_store(sweep_dir: Path) -> str:
    """The tracking URI of the sweep's MLflow store."""
    return f"sqlite:///{sweep_dir / MLFLOW_DB}"
