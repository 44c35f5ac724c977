"""Sweeps: spec validation (no Ray), then real sweeps on the session's local Ray with logical GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbglm.errors import NbglmError
from nbglm.sweep.space import load_spec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"


# --- spec ---------------------------------------------------------------------------------------


def test_spec_sets_space_and_list_choices_round_trip() -> None:
    spec = load_spec(SMOKE, ["search.num_samples=5", "overrides.train.epochs=4", "search.space.model.rank.high=16",
                             "storage_path=/data/sweeps", "seeds=[7, 8, 9]"])
    assert spec.search.num_samples == 5 and spec.seeds == [7, 8, 9]
    assert spec.sweep_dir == Path("/data/sweeps/smoke")
    assert spec.space["model.rank"].high == 16
    space = spec.optuna_space()
    assert space["model.g_mlp_hidden"].choices == ("[]", "[32]", "[64, 32]")  # scalars for Optuna/HParams
    cfg = spec.experiment_dict({"model.rank": 3, "train.lr": 2e-3, "model.g_mlp_hidden": "[64, 32]",
                                "model.gp_activation": "relu"})
    assert cfg["model"]["g_mlp_hidden"] == [64, 32] and cfg["model"]["rank"] == 3
    assert cfg["train"]["epochs"] == 4  # the override reached the base experiment config
    assert cfg["data"]["synthetic"]["n_genes"] == 100


def test_relative_storage_path_resolves_under_the_working_directory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_spec(SMOKE).sweep_dir == tmp_path / "sweep_results" / "smoke"
    assert load_spec(SMOKE, [f"storage_path=file://{tmp_path}/shared"]).sweep_dir == tmp_path / "shared" / "smoke"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("serch.num_samples=3", "unknown key 'serch'; did you mean 'search'"),
        ("search.num_sample=3", "unknown key 'search.num_sample'; did you mean 'search.num_samples'"),
        ("search.space.model.rnk={type: int, low: 1, high: 3}",
         "'model.rnk' is not a config key; did you mean 'model.rank'"),
        ("seeds=[]", "'seeds' is empty"),
        ("seeds=[1, 1]", "duplicates"),
        ("search.space.model.rank.low=0", "log scale needs low > 0"),
        ("search.space.model.rank={type: float, low: 1.5, high: 3}", "expected an integer"),
        ("search.space.model.gp_activation.choices=[swish]", "value 'swish' is rejected"),
        ("search.space.model.rank.step=2", "unknown field 'step'"),
        ("search.space={}", "search.space is empty"),
        ("search.sampler=grid", "one of tpe, random, nsga2, cmaes"),
        ("overrides.train.epoch=3", "unknown config key 'train.epoch'; did you mean 'train.epochs'"),
        ("overrides.pipeline.mode=multi_seed", "use train_sample_eval"),
        ("base_config=missing.yaml", "base_config not found"),
        ("metric=accuracy", "one of overall_score, des, pds, mae"),
        ("resources.cpu=0", "resources.cpu must be > 0"),
        ("max_failures=-1", "max_failures must be >= 0"),
        ("name=a/b", "plain directory name"),
        ("storage_path=s3://bucket/sweeps", "only local paths and file:// are supported"),
    ],
)
def test_bad_specs_are_one_line_errors(override: str, needle: str) -> None:
    with pytest.raises(NbglmError) as err:
        load_spec(SMOKE, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_a_vcc2026_metric_sets_the_profile_and_an_inconsistent_one_is_one_line() -> None:
    from nbglm.metrics import names

    spec = load_spec(SMOKE, ["metric=vcc2026_score"])
    assert spec.resolve_base().evaluate.profile == "vcc2026" and spec.metrics == names("vcc2026")
    assert load_spec(SMOKE).resolve_base().evaluate.profile == "vcc2025"
    with pytest.raises(NbglmError, match="a vcc2026 metric but overrides sets evaluate.profile=vcc2025") as err:
        load_spec(SMOKE, ["metric=de_wilcoxon_sig_jaccard", "overrides.evaluate.profile=vcc2025"])
    assert "\n" not in str(err.value)
    with pytest.raises(NbglmError, match="mixes metric profiles"):
        load_spec(SMOKE, ["metric=[des, pds_cosine]", "mode=[max, max]"])


def test_flagship_spec_is_valid() -> None:
    spec = load_spec(ROOT / "sweeps" / "rank_search.yaml")
    assert len(spec.seeds) == 2 and spec.selection.folds == 3 and spec.metric == "overall_score" and spec.mode == "max"
    assert {"model.rank", "train.lr"} <= set(spec.space)


# --- sweeps on Ray ------------------------------------------------------------------------------


def _csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def _num(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def _peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at the same instant."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    peak = running = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def _sweep_sets(tmp_path: Path, *extra: str) -> list[str]:
    return [f"storage_path={tmp_path}", *extra]


def test_sweep_packs_units_on_logical_gpus_and_exports_cv_statistics(ray_local, tmp_path: Path) -> None:
    import collections
    import statistics

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nbglm.config import load_config
    from nbglm.sweep.runner import run_sweep

    rows = run_sweep(SMOKE, sets=_sweep_sets(tmp_path, "seeds=[1,2]", "search.num_samples=2", "max_concurrent=2",
                                             "resources.cpu=0.2", "resources.gpu=0.25")).rows
    sweep_dir = tmp_path / "smoke"
    configs = _csv(sweep_dir / "results" / "configs.csv")
    trials = _csv(sweep_dir / "results" / "trials.csv")
    assert len(configs) == 2 and len(trials) == 8 and len(rows) == 2
    assert all(c["status"] == "ok" and c["n_units_ok"] == c["n_units"] == "4" for c in configs)  # 2 folds x 2 seeds
    assert len({(t["trial_id"], t["fold"], t["seed"]) for t in trials}) == 8

    # 8 units of 0.25 GPU, two configs' seeds in flight together: 4 units on each logical GPU
    assert collections.Counter(t["gpu_ids"] for t in trials) == {"0": 4, "1": 4}
    spans = {}
    for c in configs:
        units = [t for t in trials if t["trial_id"] == c["trial_id"]]
        intervals = [(float(t["start"]), float(t["end"])) for t in units]
        assert _peak_overlap(intervals) >= 2, f"units of {c['trial_id']} did not run concurrently"
        spans[c["trial_id"]] = (min(a for a, _ in intervals), max(b for _, b in intervals))
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, "the two configs did not run at the same time"

    for c in configs:
        trial_dir = sweep_dir / f"config_{c['trial_id']}"
        for m in ("overall_score", "des", "pds", "mae"):
            per_unit = [json.loads((trial_dir / f"fold_{f}" / f"seed_{s}" / "metrics" / "metrics.json").read_text())[m]
                        for f in (0, 1) for s in (1, 2)]
            assert _num(c[f"{m}_mean"]) == pytest.approx(statistics.fmean(per_unit))
            assert _num(c[f"{m}_std"]) == pytest.approx(statistics.stdev(per_unit))
            assert (_num(c[f"{m}_min"]), _num(c[f"{m}_max"])) == pytest.approx((min(per_unit), max(per_unit)))
        events = EventAccumulator(str(trial_dir))
        events.Reload()
        hparams = set(events.PluginTagToContent("hparams"))
        assert {"_hparams_/session_start_info", "_hparams_/session_end_info"} <= hparams
        assert len(events.Scalars("loss/fold_1_seed_2")) == 3  # one point per epoch
        mean = events.Scalars("cv_mean/overall_score")[0].value
        assert mean == pytest.approx(_num(c["overall_score_mean"]), rel=1e-5)

    root = EventAccumulator(str(sweep_dir))
    root.Reload()
    assert "_hparams_/experiment" in root.PluginTagToContent("hparams")  # one HParams table for all configs

    best = max(configs, key=lambda c: _num(c["overall_score_mean"]))
    best_cfg = load_config(sweep_dir / "results" / "best_config.yaml")
    assert best_cfg.model.rank == int(best["model.rank"])
    assert best_cfg.model.g_mlp_hidden == yaml.safe_load(best["model.g_mlp_hidden"])
    assert best_cfg.train.epochs == 3
    assert ray_local.is_initialized()  # the driver reused the session's Ray and left it up


def test_sweep_on_the_vcc2026_score_exports_its_profile(ray_local, tmp_path: Path) -> None:
    import statistics

    from nbglm.metrics import names
    from nbglm.report import write_report
    from nbglm.sweep.runner import run_sweep

    run_sweep(SMOKE, sets=_sweep_sets(tmp_path, "metric=vcc2026_score"))
    sweep_dir = tmp_path / "smoke"
    configs = _csv(sweep_dir / "results" / "configs.csv")
    trials = _csv(sweep_dir / "results" / "trials.csv")
    metrics = names("vcc2026")
    assert len(configs) == 2 and all(c["status"] == "ok" for c in configs) and len(trials) == 8
    assert {f"{m}_{s}" for m in metrics for s in ("mean", "std", "min", "max")} <= set(configs[0])
    assert set(metrics) <= set(trials[0]) and "des_mean" not in configs[0] and "des" not in trials[0]
    for c in configs:
        units = [json.loads((sweep_dir / f"config_{c['trial_id']}" / f"fold_{f}" / f"seed_{s}" / "metrics"
                             / "metrics.json").read_text()) for f in (0, 1) for s in (1, 2)]
        assert all(set(u["vcc2026_scaled"]) == set(metrics[1:]) for u in units)
        assert _num(c["vcc2026_score_mean"]) == pytest.approx(statistics.fmean(u["vcc2026_score"] for u in units))
        assert _num(c["pds_cosine_mean"]) == pytest.approx(statistics.fmean(u["vcc2026"]["pds_cosine"] for u in units))
    final = json.loads((sweep_dir / "results" / "final" / "metrics.json").read_text())
    assert final["metric"] == "vcc2026_score" and set(final["configs"][0]["test"]) == set(metrics)
    assert "profile: vcc2026" in (sweep_dir / "results" / "best_config.yaml").read_text()
    html = write_report(sweep_dir).read_text()
    assert "VCC 2026 score" in html and "No baseline models" in html


def test_crashed_trial_is_retried_and_a_finished_sweep_is_not_rerun(ray_local, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from nbglm.sweep.runner import run_sweep
    from nbglm.sweep.units import FAULTS_ENV

    sets = _sweep_sets(tmp_path, "search.num_samples=1", "max_failures=1")
    monkeypatch.setenv(FAULTS_ENV, '{"fail_first_attempt": true}')
    run_sweep(SMOKE, sets=sets)
    monkeypatch.delenv(FAULTS_ENV)
    sweep_dir = tmp_path / "smoke"
    configs = _csv(sweep_dir / "results" / "configs.csv")
    trials = _csv(sweep_dir / "results" / "trials.csv")
    assert [c["status"] for c in configs] == ["ok"] and [t["status"] for t in trials] == ["ok"] * 4
    trial_dir = sweep_dir / f"config_{configs[0]['trial_id']}"
    assert (trial_dir / "attempts").read_text() == "2"  # crashed once, retried once

    with pytest.raises(NbglmError, match="already holds a sweep"):
        run_sweep(SMOKE, sets=sets)
    with pytest.raises(NbglmError, match=r"spec differs .*\(at 'spec.overrides.train.epochs'\)"):
        run_sweep(SMOKE, sets=[*sets, "overrides.train.epochs=4"], resume=True)
    unit_files = sorted((trial_dir / "units").glob("fold_*_seed_*.json"))
    assert len(unit_files) == 4
    records = [json.loads(p.read_text()) for p in unit_files]
    final = (sweep_dir / "results" / "final" / "metrics.json").read_text()
    run_sweep(SMOKE, sets=sets, resume=True)  # nothing left to do: no trial and no refit runs again
    assert [json.loads(p.read_text()) for p in unit_files] == records
    assert _csv(sweep_dir / "results" / "configs.csv") == configs
    assert (sweep_dir / "results" / "final" / "metrics.json").read_text() == final


def test_a_config_whose_seeds_all_fail_is_reported_failed(ray_local, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from nbglm.cli import main
    from nbglm.sweep.units import FAULTS_ENV

    monkeypatch.setenv(FAULTS_ENV, '{"fail_seeds": [1, 2]}')
    code = main(["sweep", str(SMOKE), *(f"--set={s}" for s in _sweep_sets(
        tmp_path, "search.num_samples=1", "max_failures=0"))])
    assert code == 1  # no config scored
    configs = _csv(tmp_path / "smoke" / "results" / "configs.csv")
    trials = _csv(tmp_path / "smoke" / "results" / "trials.csv")
    assert len(configs) == 1 and configs[0]["status"] == "failed" and configs[0]["n_units_ok"] == "0"
    assert "injected failure of seed 1" in configs[0]["error"]
    assert [t["status"] for t in trials] == ["failed"] * 4
    assert all("injected failure" in t["error"] for t in trials)
    assert not (tmp_path / "smoke" / "results" / "best_config.yaml").exists()
    assert not (tmp_path / "smoke" / "results" / "final").exists()


def test_resources_beyond_the_cluster_are_one_line_errors(ray_local, tmp_path: Path) -> None:
    from nbglm.sweep.runner import run_sweep

    with pytest.raises(NbglmError, match="largest node has 2 GPU"):
        run_sweep(SMOKE, sets=_sweep_sets(tmp_path, "resources.gpu=3"))
    with pytest.raises(NbglmError, match="largest node has 2 CPU"):
        run_sweep(SMOKE, sets=_sweep_sets(tmp_path, "resources.cpu=3"))


def test_unreachable_address_is_a_fast_one_line_error() -> None:
    from nbglm.sweep.cluster import check_address

    with pytest.raises(NbglmError, match="cannot reach Ray at 127.0.0.1:1"):
        check_address("127.0.0.1:1")
    with pytest.raises(NbglmError, match="bad Ray address"):
        check_address("localhost")


def _kill_processes_with_env(name: str, value: str) -> None:
    """SIGKILL every process of ours whose environment has name=value (the killed driver's Ray)."""
    import os
    import signal

    needle = f"{name}={value}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _in_saved_state(sweep_dir: Path, trial_id: str) -> bool:
    """Whether Tune's experiment state on disk (what a resume restores) lists the trial.

    Tune saves it every second, in the background; a config that finished within that window of a
    crash is not in it, and a resume samples a new config instead (runner docstring)."""
    return any(f'\\"trial_id\\": \\"{trial_id}\\"' in f.read_text(errors="ignore")
               for f in sweep_dir.glob("experiment_state-*.json"))


def _kill_mid_sweep(tmp_path: Path, sets: list[str]) -> list[Path]:
    """Run the sweep in a driver process and SIGKILL it (and its Ray) once a finished config is in
    Tune's saved state and the next one is running; return the finished configs' directories."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from nbglm.sweep.aggregate import read_record

    sweep_dir = tmp_path / "smoke"
    ray_tmp = tempfile.mkdtemp(prefix="nbr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), str(SMOKE), *(f"--set={s}" for s in sets)],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:  # kill once a finished config is in Tune's saved state and the next one is running
            finished = [d for d in sweep_dir.glob("config_*")
                        if all(read_record(d, f, s) for f in (0, 1) for s in (1, 2))
                        and _in_saved_state(sweep_dir, d.name.removeprefix("config_"))]
            started = list(sweep_dir.glob("config_*/attempts"))
            if finished and len(started) > len(finished):
                break
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the driver made no progress"
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        _kill_processes_with_env("RAY_TMPDIR", ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        log.close()
    return finished


def test_sigkill_mid_sweep_then_resume_runs_nothing_twice_and_loses_nothing(ray_local, tmp_path: Path) -> None:
    from nbglm.sweep.aggregate import read_record
    from nbglm.sweep.runner import run_sweep

    sets = _sweep_sets(tmp_path, "search.num_samples=4", "max_concurrent=1")
    sweep_dir = tmp_path / "smoke"
    finished = _kill_mid_sweep(tmp_path, sets)
    units = [(f, s) for f in (0, 1) for s in (1, 2)]
    before = {d.name.removeprefix("config_"): [read_record(d, *u) for u in units] for d in finished}

    run_sweep(SMOKE, sets=sets, resume=True)
    configs = _csv(sweep_dir / "results" / "configs.csv")
    trials = _csv(sweep_dir / "results" / "trials.csv")
    assert len(configs) == 4 and len({c["trial_id"] for c in configs}) == 4  # the searcher went on to num_samples
    assert all(c["status"] == "ok" for c in configs)
    assert len(trials) == 16 and len({(t["trial_id"], t["fold"], t["seed"]) for t in trials}) == 16
    for trial_id, records in before.items():  # finished before the kill: kept, not run again
        assert trial_id in {c["trial_id"] for c in configs}
        assert [read_record(sweep_dir / f"config_{trial_id}", *u) for u in units] == records
    assert json.loads((sweep_dir / "results" / "final" / "metrics.json").read_text())["selected"] in {
        c["trial_id"] for c in configs}  # the resumed sweep chose and refit once it was complete


def test_sigkill_with_asha_and_the_study_then_resume_loses_and_repeats_nothing(ray_local, tmp_path: Path) -> None:
    import optuna

    from nbglm.sweep.aggregate import read_record
    from nbglm.sweep.runner import run_sweep
    from nbglm.sweep.search import TUNE_TRIAL_ID, study_storage

    sets = _sweep_sets(tmp_path, "search.num_samples=4", "max_concurrent=1", "search.sampler=random",
                       "early_stopping={type: asha, min_epochs: 1, reduction_factor: 2}", "overrides.train.epochs=6",
                       "overrides.train.steps_per_epoch=40")
    sweep_dir = tmp_path / "smoke"
    finished = _kill_mid_sweep(tmp_path, sets)
    units = [(f, s) for f in (0, 1) for s in (1, 2)]
    before = {d.name.removeprefix("config_"): [read_record(d, *u) for u in units] for d in finished}
    storage = study_storage(sweep_dir)
    told = {t.user_attrs[TUNE_TRIAL_ID]: (t.state, t.values) for t in optuna.load_study(
        study_name="smoke", storage=storage).trials if t.state.is_finished()}
    assert set(before) <= set(told)  # the study was on disk before the kill

    run_sweep(SMOKE, sets=sets, resume=True)
    configs = {c["trial_id"]: c for c in _csv(sweep_dir / "results" / "configs.csv")}
    assert len(configs) == 4 and {c["status"] for c in configs.values()} <= {"ok", "stopped"}
    for trial_id, records in before.items():  # finished before the kill: kept, not run again
        assert [read_record(sweep_dir / f"config_{trial_id}", *u) for u in units] == records
    study = optuna.load_study(study_name="smoke", storage=storage)
    by_config = {}
    for t in study.trials:
        assert t.state != optuna.trial.TrialState.RUNNING
        if t.state != optuna.trial.TrialState.FAIL:  # FAIL: sampled in the second before the kill, replaced
            assert t.user_attrs[TUNE_TRIAL_ID] not in by_config, "a config was told twice"
            by_config[t.user_attrs[TUNE_TRIAL_ID]] = t
    assert set(by_config) == set(configs)  # every config in the study, once
    for trial_id, trial in by_config.items():
        stopped = configs[trial_id]["status"] == "stopped"
        assert trial.state == (optuna.trial.TrialState.PRUNED if stopped else optuna.trial.TrialState.COMPLETE)
        if trial_id in told:  # told before the kill: the same outcome after the resume
            assert (trial.state, trial.values) == told[trial_id]
    assert (sweep_dir / "asha.pkl").is_file()
    assert json.loads((sweep_dir / "results" / "final" / "metrics.json").read_text())["selected"] in {
        t for t, c in configs.items() if c["status"] == "ok"}
