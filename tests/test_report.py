"""Sweep report: built from a real (tiny) sweep on the session's local Ray, read back as files."""

from __future__ import annotations

import base64
import json
import csv
import logging
import re
import shutil
from pathlib import Path

import pytest

from nbglm.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = {"overall_score_vs_params.png", "des_vs_params.png", "pds_vs_params.png", "mae_vs_params.png",
           "best_vs_baselines.png", "per_perturbation.png", "cv_vs_test.png"}


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep_dir(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke sweep (2 configs x 2 folds x 2 seeds); its driver writes the report as its last step."""
    root = tmp_path_factory.mktemp("report")
    sets = [f"storage_path={root}", "search.num_samples=2", "seeds=[1, 2]"]
    assert main(["sweep", str(SMOKE), *(f"--set={s}" for s in sets)]) == 0
    return root / "smoke"


def test_the_sweep_driver_writes_the_report_and_the_baselines(sweep_dir: Path) -> None:
    assert (sweep_dir / "report" / "report.html").is_file()
    assert {p.name for p in (sweep_dir / "report").glob("*.png")} == FIGURES
    rows = _csv(sweep_dir / "results" / "baselines.csv")
    assert list(rows[0]) == ["model", "fold", "seed", "overall_score", "des", "pds", "mae"]
    assert sorted((r["model"], r["fold"], r["seed"]) for r in rows) == sorted(  # through the sweep's folds
        (m, f, s) for m in ("cell_mean", "linear", "control") for f in ("0", "1") for s in ("1", "2"))
    assert all(float(r["overall_score"]) == 0.0 for r in rows if r["model"] == "cell_mean")  # VCC: 0 by design


def test_nbglm_report_writes_real_pngs(sweep_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(sweep_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(sweep_dir / "report" / "report.html")
    for name in FIGURES:
        data = (sweep_dir / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 10_000, f"{name} is only {len(data)} bytes"


def test_html_opens_with_the_top_configs_table_and_embeds_every_figure(sweep_dir: Path) -> None:
    page = (sweep_dir / "report" / "report.html").read_text()
    configs = _csv(sweep_dir / "results" / "configs.csv")
    best = max(configs, key=lambda c: float(c["overall_score_mean"]))
    first_img = page.index("<img")
    assert page.index("<table") < first_img
    assert page.index(f"{float(best['overall_score_mean']):.4f} ± {float(best['overall_score_std']):.4f}") < first_img
    assert page.index(best["trial_id"]) < first_img
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == page.count("<img") == len(FIGURES)
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.removeprefix("data:image/png;base64,")).startswith(PNG_MAGIC)
    assert "http://" not in page and "https://" not in page  # no external assets


def test_lost_seed_bundles_are_rerun_and_saved_baselines_are_reused(sweep_dir: Path, tmp_path: Path) -> None:
    from nbglm.report import write_report

    copy = tmp_path / "smoke"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("seed_*"))
    baselines = (copy / "results" / "baselines.csv").read_text()
    page = write_report(copy).read_text()
    assert "from a rerun of trial" in page
    assert (copy / "results" / "baselines.csv").read_text() == baselines


def test_a_directory_that_is_not_a_sweep_is_a_one_line_error(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a sweep directory" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "report").exists()


def test_a_failed_report_after_a_sweep_is_only_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from nbglm.report import report_after_sweep

    with caplog.at_level(logging.WARNING, logger="nbglm"):
        report_after_sweep(tmp_path)
    assert "sweep report not written" in caplog.text and "nbglm report" in caplog.text


def test_the_report_sets_each_refit_configs_cv_score_beside_its_test_score(sweep_dir: Path) -> None:
    final = json.loads((sweep_dir / "results" / "final" / "metrics.json").read_text())
    configs = _csv(sweep_dir / "results" / "configs.csv")
    best = max(configs, key=lambda c: float(c["overall_score_mean"]))
    assert final["selected"] == best["trial_id"]  # chosen by the CV score, not the test score
    cv = final["configs"][0]["cv"]["overall_score"]
    assert cv["mean"] == pytest.approx(float(best["overall_score_mean"]))
    test = final["configs"][0]["test"]["overall_score"]
    assert final["configs"][0]["cv_minus_test"] == pytest.approx(cv["mean"] - test["mean"])
    page = (sweep_dir / "report" / "report.html").read_text()
    assert "scored once on the test set" in page and f"{cv['mean']:.4f}" in page and f"{test['mean']:.4f}" in page
