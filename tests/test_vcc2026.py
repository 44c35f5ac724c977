"""Parity of the vcc2026 profile with cell-eval2 0.20, and the 2026 submission checks.

cell-eval2 pins what nbglm's venv cannot share (polars, scanpy, its own anndata), so it runs in
an isolated venv created once per machine (``NBGLM_CELLEVAL2_VENV``, default
``~/.cache/nbglm/celleval2-0.20.0``) and is driven through ``tests/celleval2_ref.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from nbglm.errors import NbglmError
from nbglm.metrics.vcc2026 import MEMBERS, build_reference, evaluate_vcc2026, scaled

HERE = Path(__file__).resolve().parent
REAL_DATA = HERE.parents[0].parent / "shared" / "data" / "scperturb_testdata_jurkat_crispr.h5ad"
CELLEVAL2 = "cell-eval2==0.20.0"


@pytest.fixture(scope="session")
def celleval2_python() -> Path:
    """The python of a venv holding cell-eval2, created on first use and reused afterwards."""
    root = Path(os.environ.get("NBGLM_CELLEVAL2_VENV", Path.home() / ".cache" / "nbglm" / "celleval2-0.20.0"))
    python = root / "bin" / "python"
    if not (root / ".complete").exists():
        venv.create(root, with_pip=True, clear=True)
        subprocess.run([python, "-m", "pip", "install", "-q", CELLEVAL2], check=True)
        (root / ".complete").touch()
    return python


def _cells(rng, mu: np.ndarray, effect: np.ndarray, n: int) -> np.ndarray:
    depth = rng.gamma(5.0, 0.2, (n, 1))
    return rng.poisson(mu * effect * depth)


def make_pair(effect_seed: int, real_seed: int, pred_seed: int, *, genes: int = 150, cells: int = 50):
    """A real and a predicted file of low Poisson counts (tie-heavy), labels partly gene names."""
    rng = np.random.default_rng(effect_seed)
    names = [f"G{i}" for i in range(genes)]
    perts = ["G0", "G1", "G2", "X1", "G7"]
    mu = rng.gamma(0.5, 2.0, genes) * 6
    effects = {}
    for p in perts:
        e = np.ones(genes)
        idx = rng.choice(genes, 25, replace=False)
        e[idx] = rng.choice([0.2, 4.0], 25)
        if p in names:
            e[names.index(p)] = 0.1
        effects[p] = e

    def draw(seed: int) -> ad.AnnData:
        r = np.random.default_rng(seed)
        blocks = [_cells(r, mu, np.ones(genes), 2 * cells)] + [_cells(r, mu, effects[p], cells) for p in perts]
        labels = ["non-targeting"] * (2 * cells) + [p for p in perts for _ in range(cells)]
        obs = pd.DataFrame({"target": labels}, index=[f"c{i}" for i in range(len(labels))])
        return ad.AnnData(X=sp.csr_matrix(np.vstack(blocks).astype(np.float32)), obs=obs, var=pd.DataFrame(index=names))

    return draw(real_seed), draw(pred_seed)


def reference(python: Path, tmp: Path, real: ad.AnnData, pred: ad.AnnData, pert_col: str, control: str) -> dict:
    real.write_h5ad(tmp / "real.h5ad")
    pred.write_h5ad(tmp / "pred.h5ad")
    out = tmp / "ref.json"
    subprocess.run([python, HERE / "celleval2_ref.py", tmp / "real.h5ad", tmp / "pred.h5ad", pert_col, control, out],
                   check=True, capture_output=True)
    return json.loads(out.read_text())


def assert_parity(ref: dict, got: dict) -> None:
    for metric, values in ref["per_perturbation"].items():
        for label, want in values.items():
            mine = got["per_perturbation"][label][metric]
            assert (want is None) == (mine is None), (metric, label, want, mine)
            if want is not None:
                assert abs(mine - want) <= 1e-6, (metric, label, want, mine)
    for key, mine in (("user", "vcc2026"), ("baseline", "vcc2026_baseline"),
                      ("replicate", "vcc2026_replicate"), ("scaled", "vcc2026_scaled")):
        for m in MEMBERS:
            assert got[mine][m] == pytest.approx(ref[key][m], abs=1e-6), (key, m)
    assert got["vcc2026_score"] == pytest.approx(ref["score"], abs=1e-6)


@pytest.mark.parametrize("case", ["independent", "replicate_like"])
def test_matches_celleval2(celleval2_python, tmp_path, case):
    real, pred = make_pair(1, 2, 3) if case == "independent" else make_pair(1, 2, 4)
    if case == "independent":
        _, pred = make_pair(5, 2, 3)
    ref = reference(celleval2_python, tmp_path, real, pred, "target", "non-targeting")
    got = evaluate_vcc2026(pred, real, pert_col="target", control="non-targeting")
    assert_parity(ref, got)
    json.dumps(got)


def test_baseline_scores_zero_and_cache_roundtrip(tmp_path):
    real, pred = make_pair(1, 2, 4)
    ref = build_reference(real, pert_col="target", control="non-targeting")
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in scaled(ref.baseline, ref).values())
    ref.save(tmp_path / "ref")
    again = evaluate_vcc2026(pred, real, pert_col="target", control="non-targeting",
                             cache=type(ref).load(tmp_path / "ref"))
    direct = evaluate_vcc2026(pred, real, pert_col="target", control="non-targeting", cache=ref)
    assert again["vcc2026_scaled"] == direct["vcc2026_scaled"]
    assert again["vcc2026_score"] > 0.3  # a replicate-like prediction sits well above the baseline


@pytest.fixture(scope="module")
def jurkat() -> ad.AnnData:
    if not REAL_DATA.exists():
        pytest.skip("../shared/data is absent")
    return ad.read_h5ad(REAL_DATA)


def test_jurkat_refused_like_celleval2(celleval2_python, tmp_path, jurkat):
    """The Jurkat panel is too shallow for the expression member: cell-eval2 refuses it, so must we."""
    jurkat.write_h5ad(tmp_path / "real.h5ad")
    run = subprocess.run([celleval2_python, HERE / "celleval2_ref.py", tmp_path / "real.h5ad", tmp_path / "real.h5ad",
                          "target_gene", "control", tmp_path / "ref.json"], capture_output=True, text=True)
    assert run.returncode != 0 and "expr_distance_unbiased" in run.stderr
    with pytest.raises(NbglmError, match="expression distance from control"):
        evaluate_vcc2026(jurkat, jurkat, pert_col="target_gene", control="control")


@pytest.fixture(scope="module")
def small_ref():
    real, pred = make_pair(1, 2, 4)
    return real, pred, build_reference(real, pert_col="target", control="non-targeting")


def _with_x(pred: ad.AnnData, x) -> ad.AnnData:
    out = pred.copy()
    out.X = sp.csr_matrix(x)
    return out


@pytest.mark.parametrize("change, message", [
    (lambda p: _with_x(p, -p.X.toarray()), "negative"),
    (lambda p: _with_x(p, np.where(np.arange(p.n_vars) == 3, np.nan, p.X.toarray())), "non-finite"),
    (lambda p: _with_x(p, np.where(np.arange(p.n_vars) == 3, np.inf, p.X.toarray())), "non-finite"),
    (lambda p: _with_x(p, p.X.toarray() + 0.5), "fractional"),
    (lambda p: _with_x(p, p.X.toarray() * 1e5), "1e6"),
    (lambda p: p[:, ::-1].copy(), "genes differ"),
    (lambda p: p[p.obs["target"] != "X1"].copy(), "labels differ"),
    (lambda p: p[p.obs["target"] != "non-targeting"].copy(), "labels differ"),
])
def test_submission_checks(small_ref, change, message):
    real, pred, ref = small_ref
    with pytest.raises(NbglmError, match=message):
        evaluate_vcc2026(change(pred), real, pert_col="target", control="non-targeting", cache=ref)


def test_cli_builds_the_reference_once_and_scores_with_it(tmp_path, capsys):
    from nbglm.cli import main

    real, pred = make_pair(1, 2, 4)
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    labels = ["--pert-col", "target", "--control", "non-targeting"]
    assert main(["build-de-cache", "--profile", "vcc2026", "--real", str(tmp_path / "real.h5ad"),
                 "--output", str(tmp_path / "ref"), *labels]) == 0
    files = ["--pred", str(tmp_path / "pred.h5ad"), "--real", str(tmp_path / "real.h5ad"), *labels]
    assert main(["eval", "--profile", "vcc2026", *files, "--de-cache", str(tmp_path / "ref"),
                 "--output", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    want = evaluate_vcc2026(pred, real, pert_col="target", control="non-targeting")
    assert set(got) >= {"vcc2026", "vcc2026_scaled", "vcc2026_score", "per_perturbation"}
    assert got["vcc2026_scaled"] == pytest.approx(want["vcc2026_scaled"], abs=1e-12)
    assert "VCC 2026 score" in capsys.readouterr().out
    # without a cache: the reference is built from real, and pred read into real's arrays after it
    assert main(["eval", "--profile", "vcc2026", *files, "--output", str(tmp_path / "n.json")]) == 0
    assert json.loads((tmp_path / "n.json").read_text()) == got
    capsys.readouterr()
    assert main(["eval", *files, "--de-cache", str(tmp_path / "ref")]) == 2  # a vcc2025 eval of a vcc2026 cache
    assert "is a vcc2026 cache, not a vcc2025 one" in capsys.readouterr().err
    assert main(["eval", "--profile", "vcc2026", *files, "--train", str(tmp_path / "real.h5ad")]) == 2
    assert "--train is the vcc2025 baseline's input" in capsys.readouterr().err
    frac = pred.copy()
    frac.X = frac.X * 0.5
    frac.write_h5ad(tmp_path / "frac.h5ad")
    assert main(["eval", "--profile", "vcc2026", "--pred", str(tmp_path / "frac.h5ad"), "--real",
                 str(tmp_path / "real.h5ad"), *labels, "--de-cache", str(tmp_path / "ref")]) == 2
    err = capsys.readouterr().err
    assert "integral raw counts" in err and err.count("\n") == 1


def test_reference_refuses_other_data(small_ref):
    real, _, ref = small_ref
    fewer = real[real.obs["target"] != "X1"].copy()
    with pytest.raises(NbglmError, match="other perturbations"):
        evaluate_vcc2026(fewer, fewer, pert_col="target", control="non-targeting", cache=ref)


def test_a_reference_that_gives_a_member_no_scale_is_refused():
    """With two perturbations the baseline and the replicate both rank each one first (pds_cosine
    1 and 1): (u - b) / (r - b) has no scale, which cell-eval2 refuses too."""
    real, _ = make_pair(1, 2, 4)
    two = real[real.obs["target"].isin(["non-targeting", "G0", "G1"])].copy()
    with pytest.raises(NbglmError, match="pds_cosine no scale") as err:
        build_reference(two, pert_col="target", control="non-targeting")
    assert "\n" not in str(err.value)


def test_a_baseline_model_refuses_the_vcc2026_profile():
    from nbglm.config import load_config
    from nbglm.pipeline import check_mode_inputs

    with pytest.raises(NbglmError, match="predicts log1p expression") as err:
        check_mode_inputs(load_config(None, ["model.name=cell_mean", "evaluate.profile=vcc2026"]))
    assert "\n" not in str(err.value)


def test_normalise_ranks_as_the_log1p_cpm_of_every_entry():
    """Ranking (row, distinct count) slots gives the ranks of every entry's log1p(CPM): with
    repeated counts, counts above the slot table, fractional values, equal values in other rows
    and an empty row."""
    from nbglm.metrics.vcc2026_de import normalise

    rng = np.random.default_rng(4)
    x = rng.poisson(2.0, (40, 60)).astype(np.float64)
    x[3, :5] = [5000, 5000, 9000, 0.5, 2.25]  # beyond the table; fractional
    x[7] = 0  # no counts
    x[10] = x[11]  # equal rows: equal values in two rows
    counts = sp.csr_matrix(x.astype(np.float32))
    got = normalise(counts)
    divisor = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel() / 1e6
    divisor[divisor == 0] = 1.0
    values = np.log1p(counts.data.astype(np.float64) / np.repeat(divisor, np.diff(counts.indptr)))
    _, inverse = np.unique(values, return_inverse=True)
    np.testing.assert_array_equal(got.ranked.data, (inverse + 1).astype(np.int32))
    np.testing.assert_array_equal(got.ranked.indices, counts.indices)
    np.testing.assert_array_equal(got.divisor, divisor)


def test_baseline_cells_normalised_from_their_distinct_rows_equal_the_whole_normalisation():
    from nbglm.metrics.vcc2026 import _stack_rows, baseline_counts
    from nbglm.metrics.vcc2026_de import normalise

    rng = np.random.default_rng(5)
    genes = np.array([f"G{i}" for i in range(50)], dtype=object)
    labels = np.array(["ctrl"] * 12 + ["G1"] * 9 + ["G2"] * 9 + ["KO"] * 9)
    counts = sp.csr_matrix(rng.poisson(1.5, (labels.size, genes.size)).astype(np.float32))
    base = baseline_counts(counts, labels, "ctrl", genes)
    assert base.rows.shape[0] < base.source.size  # cells drawn with replacement share rows
    control = counts[labels == "ctrl"]
    whole = normalise(_stack_rows(control, base.counts(), np.ones(base.source.size, dtype=bool)))
    got = base.normalised_under(control)
    np.testing.assert_array_equal(got.divisor, whole.divisor)
    assert (got.ranked != whole.ranked).nnz == 0


def test_order_codes_and_row_stacking_match_their_plain_numpy_forms():
    from nbglm.metrics.vcc2026 import _stack_rows
    from nbglm.metrics.vcc2026_de import order_codes

    rng = np.random.default_rng(0)
    values = np.log1p(rng.poisson(3.0, 5000) / rng.uniform(0.5, 2.0, 5000))
    values[::7] = values[3]  # ties
    _, inverse = np.unique(values, return_inverse=True)
    np.testing.assert_array_equal(order_codes(values), (inverse + 1).astype(np.int32))
    top = sp.random(5, 40, density=0.3, format="csr", random_state=1, dtype=np.float32)
    x = sp.random(30, 40, density=0.3, format="csr", random_state=2, dtype=np.float32)
    rows = rng.random(30) < 0.5
    stacked = _stack_rows(top, x, rows)
    np.testing.assert_array_equal(stacked.toarray(), sp.vstack([top, x[rows]]).toarray())


def test_a_prediction_on_disk_scores_as_in_memory(tmp_path):
    """`evaluate(..., pred_counts=Rows of the file)` (how a run scores the pred.h5ad it sampled to
    disk) gives the vcc2026 numbers of the prediction in memory."""
    from nbglm.data.io import write_h5ad_rows
    from nbglm.data.rows import OnDisk, Rows
    from nbglm.metrics import evaluate

    real, pred = make_pair(1, 2, 5)
    path = tmp_path / "pred.h5ad"
    totals = write_h5ad_rows(path, pred.obs, pred.var, (pred.X[i:i + 64] for i in range(0, pred.n_obs, 64)))
    on_disk = evaluate(ad.AnnData(obs=pred.obs, var=pred.var), real, pert_col="target", control="non-targeting",
                       profile="vcc2026", pred_counts=Rows(OnDisk(path), counts_totals=totals))
    assert on_disk == evaluate(pred, real, pert_col="target", control="non-targeting", profile="vcc2026")
