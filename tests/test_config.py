"""Config resolution: defaults <- YAML <- --set, and one-line errors for every bad key or value."""

from pathlib import Path

import pytest
import yaml

from nbglm.cli import main
from nbglm.config import Config, all_keys, load_config, to_dict
from nbglm.errors import NbglmError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_yaml_and_overrides_merge(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"rank": 4, "gp_norm": "none"}, "train": {"epochs": 3}}))
    cfg = load_config(cfg_file, ["model.rank=8", "model.g_mlp_hidden=[256,128]", "train.lr=1e-3"])
    assert cfg.model.rank == 8  # --set beats the file
    assert cfg.model.gp_norm == "none"  # file beats the default
    assert cfg.train.epochs == 3
    assert cfg.model.g_mlp_hidden == [256, 128]
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.p_out_dim == Config().model.p_out_dim  # untouched default
    assert load_config(None, ["model.rank=null"]).model.rank is None


def test_default_config_file_resolves_with_no_paths() -> None:
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.paths.train_h5ad is None and cfg.paths.test_h5ad is None


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.rnk=3", "did you mean 'model.rank'"),
        ("modle.rank=3", "did you mean 'model'"),
        ("model.rank=0", "positive integer or null"),
        ("model.gp_dropout=1.0", "[0, 1)"),
        ("model.gp_dropout=-0.1", "[0, 1)"),
        ("model.gp_activation=swish", "one of relu, gelu, silu, tanh, identity"),
        ("train.epochs=1.5", "expected an integer"),
        ("train.lr=fast", "expected a number"),
        ("model.g_mlp_hidden=[64,-1]", "list of positive integers"),
        ("pipeline.mode=train_only", "one of train_sample_eval"),
        ("model.rank", "expected KEY=VALUE"),
        ("model.rank.x=3", "config key 'model.rank'"),
    ],
)
def test_bad_overrides_name_key_value_and_allowed(override: str, needle: str) -> None:
    with pytest.raises(NbglmError) as err:
        load_config(None, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_all_keys_lists_dotted_leaves() -> None:
    keys = all_keys()
    assert "model.rank" in keys and "model.losses.primary" in keys and "train.lr_schedule.min_lr" in keys
    assert "model" not in keys


def test_cli_config_prints_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "model.rank=5", "--set", "experiment.seed=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["rank"] == 5 and printed["experiment"]["seed"] == 7
    assert printed == to_dict(load_config(None, ["model.rank=5", "experiment.seed=7"]))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["config", "--config", "does/not/exist.yaml"], "config file not found"),
        (["config", "--set", "model.rank"], "expected KEY=VALUE"),
        (["config", "--set", "model.rank=-2"], "model.rank"),
    ],
)
def test_cli_config_errors_are_one_line_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err


def test_bad_yaml_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  rank: [1,\n")
    with pytest.raises(NbglmError, match="not valid YAML"):
        load_config(bad)
