"""How a sweep searches (nbglm.sweep.search): ASHA early stopping, several objectives and their
Pareto front, the persistent Optuna study, warm start, the sampler's budget; refusals first (no Ray)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from nbglm.cli import main
from nbglm.errors import NbglmError
from nbglm.sweep.space import load_spec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
ASHA = "early_stopping={type: asha, min_epochs: 1, reduction_factor: 2}"
MULTI = ["metric=[des, pds, mae]", "mode=[max, max, min]"]
# Epochs long enough that a stop decision lands while the stopped units still train.
SLOW_EPOCHS = ["overrides.train.epochs=8", "overrides.train.steps_per_epoch=60"]


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _fake_sweep(path: Path, spec_sets: list[str], rows: list[dict]) -> Path:
    """A finished sweep's files as warm start reads them (sweep.yaml, results/configs.csv)."""
    spec = load_spec(SMOKE, spec_sets)
    (path / "results").mkdir(parents=True)
    (path / "sweep.yaml").write_text(yaml.safe_dump({"spec": spec.raw, "base_config": {}}))
    with (path / "results" / "configs.csv").open("w") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


WARM_ROWS = [
    {"trial_id": "aaaa0001", "model.rank": "3", "train.lr": "0.002", "model.g_mlp_hidden": "[64, 32]",
     "model.gp_activation": "relu", "status": "ok", "overall_score_mean": "0.41", "des_mean": "0.3",
     "pds_mean": "0.8", "mae_mean": "0.2"},
    {"trial_id": "aaaa0002", "model.rank": "7", "train.lr": "0.008", "model.g_mlp_hidden": "[]",
     "model.gp_activation": "gelu", "status": "ok", "overall_score_mean": "0.12", "des_mean": "0.2",
     "pds_mean": "0.7", "mae_mean": "0.3"},
    {"trial_id": "aaaa0003", "model.rank": "5", "train.lr": "0.004", "model.g_mlp_hidden": "[32]",
     "model.gp_activation": "gelu", "status": "stopped", "overall_score_mean": "", "des_mean": "",
     "pds_mean": "", "mae_mean": ""},
]


# --- refusals: one line, exit 2, nothing written -----------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["early_stopping={type: asha, min_epochs: 3}"], "min_epochs = 3 must be >= 1 and below train.epochs = 3"),
        (["early_stopping={type: hyperband, min_epochs: 1}"], "early_stopping.type = 'hyperband' is unknown"),
        ([ASHA, *MULTI], "cannot serve several objectives"),
        (["metric=[des, pds, mae]", "mode=[max, max]"], "differ in length"),
        (["metric=[des, pds]"], "differ in length"),
        (["early_stopping={min_epochs: 1, reduction_factor: 1}"], "reduction_factor = 1.0 must be > 1"),
        (["search.sampler=cmaes", *MULTI], "cmaes optimises one objective"),
        (["callbacks=[wandb]"], "callbacks: 'wandb' is unknown"),
    ],
)
def test_bad_search_settings_are_one_line_exit_2_and_write_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], needle: str) -> None:
    assert main(["sweep", str(SMOKE), f"--set=storage_path={tmp_path}", *(f"--set={s}" for s in sets)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_warm_start_from_a_sweep_over_another_space_is_refused(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    old = _fake_sweep(tmp_path / "old", ["search.space.model.rank.high=16"], WARM_ROWS)
    out = tmp_path / "new"
    assert main(["sweep", str(SMOKE), f"--set=storage_path={out}", f"--set=search.warm_start={old}"]) == 2
    err = capsys.readouterr().err
    assert "searched another space" in err and err.count("\n") == 1
    assert not out.exists()
    with pytest.raises(NbglmError, match="is not a sweep directory"):
        load_spec(SMOKE, [f"search.warm_start={tmp_path}"])


# --- samplers and warm start (Optuna, no Ray) ------------------------------------------------------------


@pytest.mark.parametrize(("samples", "startup"), [(2, 4), (16, 4), (64, 16)])
def test_tpe_start_up_scales_with_the_budget(samples: int, startup: int) -> None:
    from nbglm.sweep.search import make_sampler

    spec = load_spec(SMOKE, [f"search.num_samples={samples}", "search.sampler=tpe"])
    assert make_sampler(spec)._n_startup_trials == startup
    nsga = make_sampler(load_spec(SMOKE, [f"search.num_samples={samples}", "search.sampler=nsga2", *MULTI]))
    assert type(nsga).__name__ == "NSGAIISampler"


def test_warm_start_adds_the_finished_configs_to_the_study_before_anything_is_sampled(tmp_path: Path) -> None:
    import optuna

    from nbglm.sweep.search import TUNE_TRIAL_ID, make_searcher, study_storage
    from nbglm.sweep.space import warm_start_rows

    old = _fake_sweep(tmp_path / "old", [], WARM_ROWS)
    spec = load_spec(SMOKE, [f"storage_path={tmp_path}", f"search.warm_start={old}"])
    spec.sweep_dir.mkdir(parents=True)
    searcher = make_searcher(spec)
    assert searcher.add_finished(spec, warm_start_rows(spec), old) == 2  # the stopped config has no score
    searcher.suggest("new00001")
    study = optuna.load_study(study_name="smoke", storage=study_storage(spec.sweep_dir))
    warm, new = study.trials[:2], study.trials[2]
    assert [t.state for t in warm] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.value for t in warm] == [0.41, 0.12]
    assert [t.user_attrs["warm_start_trial_id"] for t in warm] == ["aaaa0001", "aaaa0002"]
    assert warm[0].params == {"model.rank": 3, "train.lr": 0.002, "model.g_mlp_hidden": "[64, 32]",
                              "model.gp_activation": "relu"}
    assert new.number == 2 and new.user_attrs[TUNE_TRIAL_ID] == "new00001"


# --- sweeps on Ray ---------------------------------------------------------------------------------------


def test_asha_stops_configs_and_optuna_records_them_pruned(ray_local, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import optuna

    from nbglm.sweep.runner import run_sweep
    from nbglm.sweep.search import TUNE_TRIAL_ID, study_storage

    run_sweep(SMOKE, sets=[f"storage_path={tmp_path}", "search.num_samples=4", "max_concurrent=1", "seeds=[1]",
                           "search.sampler=random", ASHA, *SLOW_EPOCHS])
    sweep_dir = tmp_path / "smoke"
    configs = {c["trial_id"]: c for c in _csv(sweep_dir / "results" / "configs.csv")}
    trials = _csv(sweep_dir / "results" / "trials.csv")
    stopped = {t for t, c in configs.items() if c["status"] == "stopped"}
    assert stopped and len(stopped) < 4, "ASHA stopped no config (or all)"
    assert all(configs[t]["overall_score_mean"] == "" for t in stopped)  # no made-up CV score
    stopped_units = [t for t in trials if t["trial_id"] in stopped and t["status"] == "stopped"]
    assert stopped_units and min(int(t["epochs_done"]) for t in stopped_units) < 8
    assert all(int(t["epochs_done"]) == 8 for t in trials if t["status"] == "ok")
    for t in stopped_units:  # the unit's record holds the signal of every epoch it trained
        record = json.loads((sweep_dir / f"config_{t['trial_id']}" / "units"
                             / f"fold_{t['fold']}_seed_{t['seed']}.json").read_text())
        assert len(record["history"]) == int(t["epochs_done"]) and record["status"] == "stopped"

    study = optuna.load_study(study_name="smoke", storage=study_storage(sweep_dir))
    states = {t.user_attrs[TUNE_TRIAL_ID]: t for t in study.trials}
    assert set(states) == set(configs)  # every config, once
    for trial_id, trial in states.items():
        if trial_id in stopped:
            assert trial.state == optuna.trial.TrialState.PRUNED and trial.value is None
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE
            assert trial.value == pytest.approx(float(configs[trial_id]["overall_score_mean"]))

    final = json.loads((sweep_dir / "results" / "final" / "metrics.json").read_text())
    assert final["selected"] not in stopped  # a stopped config is never refit
    out = capsys.readouterr().out
    assert "4/4 configs (" in out and "stopped early), best so far overall_score" in out and "ETA" in out
    progress = [line for line in out.splitlines() if line.startswith("sweep 'smoke': ") and " configs" in line]
    assert [line.split(": ")[1].split(" ")[0] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]


def test_multi_objective_sweep_exports_its_pareto_front(ray_local, tmp_path: Path) -> None:
    import optuna

    from nbglm.config import load_config
    from nbglm.report.figures import plot_pareto
    from nbglm.report.read import load_sweep
    from nbglm.sweep.runner import run_sweep
    from nbglm.sweep.search import study_storage

    run_sweep(SMOKE, sets=[f"storage_path={tmp_path}", "search.num_samples=5", "seeds=[1]", "search.sampler=nsga2",
                           *MULTI])
    sweep_dir = tmp_path / "smoke"
    rows = _csv(sweep_dir / "results" / "configs.csv")
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    points = {r["trial_id"]: (float(r["des_mean"]), float(r["pds_mean"]), -float(r["mae_mean"])) for r in rows}

    def dominated(p: tuple, by: tuple) -> bool:
        return all(b >= a for a, b in zip(p, by)) and any(b > a for a, b in zip(p, by))

    for r in rows:
        beaten = any(dominated(points[r["trial_id"]], q) for t, q in points.items() if t != r["trial_id"])
        assert (r["pareto"] == "True") == (not beaten), r
    front = [r for r in rows if r["pareto"] == "True"]
    assert sorted(p.name for p in (sweep_dir / "results" / "pareto").glob("*.yaml")) == sorted(
        f"config_{r['trial_id']}.yaml" for r in front)
    picked = max(front, key=lambda r: float(r["overall_score_mean"]))
    best = load_config(sweep_dir / "results" / "best_config.yaml")
    assert best.model.rank == int(picked["model.rank"])
    assert f"(trial {picked['trial_id']})" in (sweep_dir / "results" / "best_config.yaml").read_text()
    assert json.loads((sweep_dir / "results" / "final" / "metrics.json").read_text())["selected"] == picked["trial_id"]

    study = optuna.load_study(study_name="smoke", storage=study_storage(sweep_dir))
    assert len(study.directions) == 3 and len(study.trials) == 5
    assert all(t.state == optuna.trial.TrialState.COMPLETE and len(t.values) == 3 for t in study.trials)
    assert plot_pareto(load_sweep(sweep_dir), tmp_path / "pareto.png").stat().st_size > 0


def test_warm_started_sweep_tells_the_old_configs_first(ray_local, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import optuna

    from nbglm.sweep.runner import run_sweep
    from nbglm.sweep.search import TUNE_TRIAL_ID, study_storage

    old = _fake_sweep(tmp_path / "old", [], WARM_ROWS)
    run_sweep(SMOKE, sets=[f"storage_path={tmp_path}", "search.num_samples=1", "seeds=[1]",
                           f"search.warm_start={old}"])
    assert "warm start with 2 finished config(s)" in capsys.readouterr().out
    study = optuna.load_study(study_name="smoke", storage=study_storage(tmp_path / "smoke"))
    assert [t.user_attrs.get("warm_start_trial_id") for t in study.trials[:2]] == ["aaaa0001", "aaaa0002"]
    assert [t.value for t in study.trials[:2]] == [0.41, 0.12]
    (row,) = _csv(tmp_path / "smoke" / "results" / "configs.csv")
    assert study.trials[2].user_attrs[TUNE_TRIAL_ID] == row["trial_id"]
    assert study.trials[2].value == pytest.approx(float(row["overall_score_mean"]))


def test_mlflow_callback_logs_every_config_to_a_local_store(ray_local, tmp_path: Path) -> None:
    import mlflow  # the [mlflow] extra, part of dev

    from nbglm.sweep.runner import run_sweep
    from nbglm.sweep.search import mlflow_store

    run_sweep(SMOKE, sets=[f"storage_path={tmp_path}", "search.num_samples=2", "seeds=[1]", "callbacks=[mlflow]"])
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_store(tmp_path / "smoke"))
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    configs = _csv(tmp_path / "smoke" / "results" / "configs.csv")
    assert len(runs) == 2
    by_rank = {r.data.params["model.rank"]: r for r in runs}
    for c in configs:
        run = by_rank[c["model.rank"]]
        assert run.data.metrics["overall_score"] == pytest.approx(float(c["overall_score_mean"]))
