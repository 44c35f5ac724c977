"""Sweeps: spec validation (no Ray), then real sweeps on the session's local Ray with logical GPUs."""

from __future__ import annotations

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


def test_relative_storage_path_resolves_under_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_spec(SMOKE).sweep_dir == tmp_path / "sweep_results" / "smoke"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("serch.num_samples=3", "unknown key 'serch'; did you mean 'search'"),
        ("search.num_sample=3", "unknown key 'search.num_sample'; did you mean 'search.num_samples'"),
        ("search.space.model.rnk={type: int, low: 1, high: 3}", "'model.rnk' is not a config key; did you mean 'model.rank'"),
        ("seeds=[]", "'seeds' is empty"),
        ("seeds=[1, 1]", "duplicates"),
        ("search.space.model.rank.low=0", "log scale needs low > 0"),
        ("search.space.model.rank={type: float, low: 1.5, high: 3}", "expected an integer"),
        ("search.space.model.gp_activation.choices=[swish]", "value 'swish' is rejected"),
        ("search.space.model.rank.step=2", "unknown field 'step'"),
        ("search.space={}", "search.space is empty"),
        ("search.sampler=grid", "one of tpe, random"),
        ("overrides.train.epoch=3", "unknown config key 'train.epoch'; did you mean 'train.epochs'"),
        ("overrides.pipeline.mode=multi_seed", "a sweep needs a mode that scores each run"),
        ("base_config=missing.yaml", "base_config not found"),
        ("metric=accuracy", "one of overall_score, des, pds, mae"),
        ("resources.cpu=0", "resources.cpu must be > 0"),
        ("max_failures=-1", "max_failures must be >= 0"),
        ("name=a/b", "plain directory name"),
    ],
)
def test_bad_specs_are_one_line_errors(override: str, needle: str) -> None:
    with pytest.raises(NbglmError) as err:
        load_spec(SMOKE, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_flagship_spec_is_valid() -> None:
    spec = load_spec(ROOT / "sweeps" / "rank_search.yaml")
    assert len(spec.seeds) == 3 and spec.metric == "overall_score" and spec.mode == "max"
    assert {"model.rank", "train.lr"} <= set(spec.space)
