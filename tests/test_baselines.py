"""Baselines run through the same pipeline and metrics as the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nbglm.baselines import predict_baseline
from nbglm.config import load_config
from nbglm.data import Dataset, load_dataset
from nbglm.errors import NbglmError
from nbglm.pipeline import run_experiment

SMALL = [
    "data.synthetic.n_genes=300",
    "data.synthetic.n_train_perts=40",
    "data.synthetic.n_test_perts=10",
    "data.synthetic.cells_per_pert=40",
    "data.synthetic.n_control=300",
]


@pytest.fixture(scope="module")
def data() -> Dataset:
    return load_dataset(load_config(None, SMALL))


def run(tmp_path: Path, data: Dataset, name: str) -> dict:
    cfg = load_config(None, [*SMALL, f"model.name={name}", f"paths.outputs_root={tmp_path}"])
    return run_experiment(cfg, data).metrics


def test_cell_mean_is_the_vcc_baseline_so_scores_zero(tmp_path: Path, data: Dataset) -> None:
    m = run(tmp_path, data, "cell_mean")
    assert m["overall_score"] == pytest.approx(0.0, abs=1e-12)
    assert m["des"] == pytest.approx(m["baseline"]["des"], abs=1e-12)
    assert m["mae"] == pytest.approx(m["baseline"]["mae"], abs=1e-12)


def test_linear_learns_from_embeddings_and_beats_cell_mean(tmp_path: Path, data: Dataset) -> None:
    linear, cell_mean = run(tmp_path, data, "linear"), run(tmp_path, data, "cell_mean")
    assert linear["pds"] > cell_mean["pds"] + 0.05
    assert linear["mae"] < cell_mean["mae"]
    assert linear["overall_score"] > 0.05


def test_control_baseline_resamples_real_control_counts(data: Dataset) -> None:
    cfg = load_config(None, [*SMALL, "model.name=control"])
    pred = predict_baseline(cfg, data, seed=0)
    labels = pred.obs[data.pert_col].astype(str)
    counts = labels.value_counts()
    for pert, n in zip(data.heldout["target_gene"], data.heldout["n_cells"]):
        assert counts[pert] == n
    x = pred.X.toarray()
    assert np.array_equal(x, np.round(x)) and x.min() >= 0  # integer counts, like real cells
    ctrl_rows = {tuple(r) for r in data.train[data.train.obs[data.pert_col] == data.control].X.toarray()}
    assert all(tuple(r) in ctrl_rows for r in x[(labels != data.control).to_numpy()][:20])


def test_baselines_have_no_checkpoint_to_sample_from(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=linear", "pipeline.mode=sample_eval", f"pipeline.pretrained_ckpt={tmp_path}"])
    with pytest.raises(NbglmError, match="baseline with no checkpoint"):
        run_experiment(cfg)
