"""Sampling held-out perturbations: cell counts, depth, layout, samplers, reproducibility, errors."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from nbglm.data import Dataset
from nbglm.errors import NbglmError
from nbglm.model import LowRankNBGLM
from nbglm.sample import library_sizes, sample_heldout
from nbglm.checkpoint import load_checkpoint, save_checkpoint
from nbglm.train import fit

from small import small_cfg

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data(small_data: Dataset) -> Dataset:
    return small_data


@pytest.fixture(scope="module")
def model(data: Dataset) -> LowRankNBGLM:
    return fit(small_cfg("model.use_cycle=true", "train.epochs=5"), data).model


def labels(pred) -> np.ndarray:
    return pred.obs["target_gene"].astype(str).to_numpy()


def test_layout_cells_and_median_umi(data: Dataset, model: LowRankNBGLM) -> None:
    pred = sample_heldout(model, data, small_cfg("sampling.batch_cells=100"), seed=0)
    assert list(pred.var_names) == data.gene_names
    assert isinstance(pred.X, sp.csr_matrix) and pred.X.dtype == np.float32
    assert np.array_equal(pred.X.data, np.round(pred.X.data)) and (pred.X.data >= 0).all()
    lab, totals = labels(pred), np.asarray(pred.X.sum(axis=1)).ravel()
    for row in data.heldout.itertuples():
        mine = lab == row.target_gene
        assert mine.sum() == row.n_cells
        assert abs(np.median(totals[mine]) / row.median_umi_per_cell - 1) < 0.1, row.target_gene
    # Control cells (default: drawn from the model): as many as the test data's, at their depth.
    ctrl = data.test[data.test.obs["target_gene"] == data.control]
    real_totals = np.asarray(ctrl.X.sum(axis=1)).ravel()
    assert (lab == data.control).sum() == ctrl.n_obs
    assert abs(np.median(totals[lab == data.control]) / np.median(real_totals) - 1) < 0.1
    assert (pred[lab == data.control].X != ctrl.X).nnz > 0
    assert pred.obs_names.is_unique
    # With control_cells=real the test data's control cells are appended unchanged.
    pred = sample_heldout(model, data, small_cfg("sampling.control_cells=real"), seed=0)
    assert (pred[labels(pred) == data.control].X != ctrl.X).nnz == 0


def test_model_controls_follow_the_control_means(data: Dataset, model: LowRankNBGLM) -> None:
    """Model-drawn controls carry no effect: their mean is the control mean at their depth."""
    pred = sample_heldout(model, data, small_cfg(), seed=0)
    cells = pred[labels(pred) == data.control].X.toarray()
    with torch.no_grad():
        expected = torch.softmax(model.log_mu_ctrl, 0).numpy() * cells.sum(axis=1).mean()
    top = np.argsort(expected)[-50:]
    assert np.abs(cells.mean(0)[top] / expected[top] - 1).mean() < 0.05


def test_model_controls_need_real_control_cells(data: Dataset, model: LowRankNBGLM) -> None:
    train = data.train[(data.train.obs["target_gene"] != data.control).to_numpy()]
    with pytest.raises(NbglmError, match="control_cells=model draws as many control cells"):
        sample_heldout(model, replace(data, train=train, test=None), small_cfg("sampling.median_umi_default=3000"),
                       seed=0)


def test_sampled_means_follow_the_model(data: Dataset, model: LowRankNBGLM) -> None:
    """Per-gene pseudobulk of sampled cells matches the model's composition for each perturbation."""
    cfg = small_cfg("sampling.library_size_cv=0", "sampling.phase_strategy=fixed_G1")
    heldout = data.heldout.assign(n_cells=400, median_umi_per_cell=5000.0)
    variances = {}
    for sampler in ("nb", "poisson", "gp_mixture"):
        pred = sample_heldout(model, replace(data, heldout=heldout), replace(
            cfg, sampling=replace(cfg.sampling, sampler=sampler)), seed=1)
        lab, x = labels(pred), pred.X.toarray()
        pert = heldout.target_gene.iloc[0]
        with torch.no_grad():
            expected = torch.softmax(model.log_mu_ctrl + model.effects(model.pert_index([pert]))[0], 0).numpy() * 5000
        cells = x[lab == pert]
        top = expected > 5
        assert np.abs(cells.mean(0)[top] / expected[top] - 1).mean() < 0.05, sampler
        variances[sampler] = (cells.var(0)[top] / expected[top]).mean()  # Poisson: ~1
    assert variances["poisson"] == pytest.approx(1.0, abs=0.1)
    assert variances["nb"] > 1.3 and variances["gp_mixture"] > variances["poisson"]


def test_same_seed_same_cells(data: Dataset, model: LowRankNBGLM) -> None:
    cfg = small_cfg("sampling.phase_strategy=global", "sampling.gamma_heterogeneity.enable=true")
    a, b, c = (sample_heldout(model, data, cfg, seed=s) for s in (3, 3, 4))
    assert (a.X != b.X).nnz == 0
    assert (a.X != c.X).nnz > 0


def test_missing_values_use_the_defaults(data: Dataset, model: LowRankNBGLM) -> None:
    heldout = data.heldout.copy()
    heldout.loc[0, "n_cells"] = np.nan
    heldout.loc[1, "median_umi_per_cell"] = np.nan
    heldout = heldout.iloc[:2]
    cfg = small_cfg("sampling.n_cells_default=77", "sampling.median_umi_default=1000")
    pred = sample_heldout(model, replace(data, heldout=heldout), cfg, seed=0)
    lab, totals = labels(pred), np.asarray(pred.X.sum(axis=1)).ravel()
    assert (lab == heldout.target_gene[0]).sum() == 77
    assert abs(np.median(totals[lab == heldout.target_gene[1]]) / 1000 - 1) < 0.1
    # median_umi_default null: the control cells' median UMI.
    only_counts = heldout[["target_gene"]].iloc[:1]
    pred = sample_heldout(model, replace(data, heldout=only_counts), small_cfg(), seed=0)
    ctrl = data.test[data.test.obs["target_gene"] == data.control]
    lab, totals = labels(pred), np.asarray(pred.X.sum(axis=1)).ravel()
    assert (lab == only_counts.target_gene[0]).sum() == 100
    assert abs(np.median(totals[lab != data.control]) / np.median(np.asarray(ctrl.X.sum(axis=1))) - 1) < 0.1


def test_controls_come_from_training_without_test_data(data: Dataset, model: LowRankNBGLM) -> None:
    pred = sample_heldout(model, replace(data, test=None), small_cfg(), seed=0)
    n_ctrl = (data.train.obs["target_gene"] == data.control).sum()
    assert (labels(pred) == data.control).sum() == n_ctrl


def test_library_sizes_have_the_median_and_spread() -> None:
    sizes = library_sizes(np.random.default_rng(0), 20001, 3000.0, 0.3)
    assert np.median(sizes) == pytest.approx(3000.0)
    assert sizes.std() / sizes.mean() == pytest.approx(0.3, rel=0.05)


def test_phase_strategy_needs_phase_labels(data: Dataset, model: LowRankNBGLM) -> None:
    with pytest.raises(NbglmError, match="phase_strategy=control needs a phase column"):
        sample_heldout(model, replace(data, phase_col=None), small_cfg("sampling.phase_strategy=control"), seed=0)
    sample_heldout(model, replace(data, phase_col=None), small_cfg("sampling.phase_strategy=fixed_S"), seed=0)


def test_heldout_without_embedding_is_an_error(data: Dataset, model: LowRankNBGLM) -> None:
    heldout = pd.concat([data.heldout, pd.DataFrame({"target_gene": ["NOPE1"], "n_cells": [5],
                                                     "median_umi_per_cell": [100.0]})], ignore_index=True)
    with pytest.raises(NbglmError, match="no embedding: NOPE1"):
        sample_heldout(model, replace(data, heldout=heldout), small_cfg(), seed=0)


def test_checkpoint_with_other_genes_is_refused(tmp_path: Path, data: Dataset, model: LowRankNBGLM) -> None:
    loaded = load_checkpoint(save_checkpoint(tmp_path / "model.pt", model, small_cfg()))
    a = sample_heldout(model, data, small_cfg(), seed=5)
    b = sample_heldout(loaded, data, small_cfg(), seed=5)
    assert (a.X != b.X).nnz == 0  # a loaded checkpoint samples exactly what the trained model does
    other = data.train[:, ::-1].copy()
    with pytest.raises(NbglmError, match="training order"):
        sample_heldout(loaded, replace(data, train=other), small_cfg(), seed=0)


def test_blocks_given_back_while_stacking_give_the_same_cells(data: Dataset, model: LowRankNBGLM,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The batches' pages are returned to the OS every few blocks while they are stacked; the
    prediction is the same as when they are all stacked first."""
    import nbglm.sample

    cfg = small_cfg("sampling.batch_cells=7")
    whole = sample_heldout(model, data, cfg, seed=5)
    monkeypatch.setattr(nbglm.sample, "_TRIM_BYTES", 1)
    trimmed = sample_heldout(model, data, cfg, seed=5)
    assert (whole.X != trimmed.X).nnz == 0 and whole.X.shape == trimmed.X.shape
    assert whole.obs.equals(trimmed.obs)
