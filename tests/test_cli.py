"""The command line and the stack it sits on: quick start, one owner per name, no test-only config."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from nbglm.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "optuna", "anndata", "numba", "scipy", "pandas", "numpy")


def _imported(*argv: str) -> set[str]:
    """Top-level packages a fresh `python -m nbglm ARGV` imports (from -X importtime)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "nbglm", *argv], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "--help"], ["run", "--help"], ["eval", "--help"],
                                  ["report", "--help"], ["split", "--help"]])
def test_help_imports_no_heavy_library(argv: list[str]) -> None:
    assert not _imported(*argv) & set(HEAVY)


@pytest.mark.parametrize("preset", [None, "0"])
def test_importing_nbglm_puts_torch_on_huge_pages_unless_the_user_chose(preset: str | None) -> None:
    """`import nbglm` sets THP_MEM_ALLOC_ENABLE=1 before torch reads it (docs/scaling.md: lower
    peaks in a unit), and keeps a value the user set."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = "import os, nbglm; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == (preset or "1")


def test_launch_py_is_nbglm_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--resume" in out.stdout and "spec" in out.stdout
    assert main(["sweep", str(ROOT / "sweeps" / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_an_unexpected_error_is_one_line_exit_1_and_debug_shows_the_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import nbglm.cli.config as command

    def boom(args: object) -> int:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(command, "run", boom)
    assert main(["config"]) == 1
    err = capsys.readouterr().err
    assert err == "error: ZeroDivisionError: planted (rerun with --debug for the traceback)\n"
    with pytest.raises(ZeroDivisionError):
        main(["config", "--debug"])


def test_fault_injection_is_not_part_of_the_config_schema() -> None:
    from nbglm.config import all_keys, load_config, to_yaml

    assert not [k for k in all_keys() if k.startswith("debug")]
    assert "debug" not in to_yaml(load_config())
    assert main(["config", "--set", "debug.fail_seeds=[1]"]) == 2


def test_model_names_are_the_nb_glm_and_the_baseline_registry() -> None:
    from nbglm.baselines import BASELINES
    from nbglm.config import ModelConfig

    literal = typing.get_type_hints(ModelConfig)["name"]
    assert set(typing.get_args(literal)) == {"lowrank_nb_glm", *BASELINES}


def test_the_metric_registry_is_the_one_list_of_names() -> None:
    from nbglm.metrics import METRICS, names
    from nbglm.sweep.space import load_spec

    assert names() == ("overall_score", "des", "pds", "mae")
    assert {m.direction for m in METRICS.values()} <= {"max", "min"}
    assert METRICS["mae"].best == 0.0 and METRICS["des"].best == 1.0
    with pytest.raises(Exception, match="one of overall_score, des, pds, mae"):
        load_spec(ROOT / "sweeps" / "smoke.yaml", ["metric=accuracy"])


def test_the_vcc2026_profile_is_registered_once_and_is_the_config_choice() -> None:
    from nbglm.config import EvaluateConfig
    from nbglm.metrics import METRICS, VCC2026_MEMBERS, names, profiles

    assert names("vcc2026") == ("vcc2026_score", *VCC2026_MEMBERS)
    assert METRICS["expr_mse_unbiased_capped_norm"].direction == "min" and METRICS["pds_cosine"].best == 1.0
    literal = typing.get_type_hints(EvaluateConfig)["profile"]
    assert set(typing.get_args(literal)) == set(profiles())
    nested = {"vcc2026": {"pds_cosine": 0.5}, "vcc2026_score": 0.1}
    assert METRICS["pds_cosine"].value(nested) == 0.5 and METRICS["vcc2026_score"].value(nested) == 0.1
    assert METRICS["pds_cosine"].value({"pds_cosine": 0.25}) == 0.25  # flat records (sweep units) too
