"""Concise mode on sums: the group sums, runs on a summarised dataset, and what a sweep unit receives."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nbglm.data import Dataset
from nbglm.data.folds import assign_folds
from nbglm.data.load import read_inputs
from nbglm.data.summary import CHUNK_ROWS, group_sums, summarized
from nbglm.metrics import build_cache
from nbglm.pipeline import run_experiment
from nbglm.sweep.folds import build_fold

from small import small_cfg

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_group_sums_equal_dense_sums_per_group(small_data: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nbglm.data.summary.CHUNK_ROWS", 97)  # many chunks, one cut inside a group
    train = small_data.train.copy()
    x = train.X.toarray().astype(np.float64)
    x[3] = 0  # a cell with no counts: counted in n_all only
    train.X = type(train.X)(x.astype(np.float32))
    sums = group_sums(train, small_data.pert_col, small_data.control, "phase")
    t = x.sum(axis=1)
    frame = pd.DataFrame({"label": train.obs[small_data.pert_col].astype(str).to_numpy(),
                          "phase": train.obs["phase"].astype(str).to_numpy()})
    assert sums.labels.size == frame.drop_duplicates().shape[0]
    ctrl_slot = {row: k for k, row in enumerate(sums.control_rows)}
    for g, (label, phase) in enumerate(zip(sums.labels, sums.phase)):
        cells = ((frame["label"] == label) & (frame["phase"] == ["G1", "S", "G2M"][phase])).to_numpy()
        pos = cells & (t > 0)
        assert (sums.n_all[g], sums.n[g]) == (cells.sum(), pos.sum())
        assert (sums.t1[g], sums.t2[g]) == (t[pos].sum(), (t[pos] ** 2).sum())
        np.testing.assert_array_equal(sums.y[g], x[pos].sum(axis=0))
        if label == small_data.control:
            k = ctrl_slot[g]
            scaled = x[pos] / t[pos, None]
            np.testing.assert_allclose(sums.moments[:, k], [(x[pos] ** 2).sum(0), scaled.sum(0), (scaled**2).sum(0)],
                                       rtol=1e-12)
            np.testing.assert_allclose(sums.inv_t[k], (1 / t[pos]).sum(), rtol=1e-12)
    assert set(ctrl_slot) == set(np.flatnonzero(sums.labels == small_data.control))
    assert sums.median_total == np.median(t) and CHUNK_ROWS > 97


@pytest.mark.parametrize("controls", ["model", "real"])
def test_a_summarised_dataset_runs_as_its_cells_do(tmp_path: Path, small_data: Dataset, controls: str) -> None:
    """Same fit (validation signal included), same sampled cells, same metrics: the sums are all a concise run uses."""
    cfg = small_cfg("train.epochs=3", f"sampling.control_cells={controls}", "model.use_cycle=true",
                    "sampling.phase_strategy=control")
    cache = build_cache(small_data.test, train=small_data.train)
    sums = summarized(small_data, keep_controls=controls == "real")
    assert sums.train is None and sums.test.X is None
    runs = [run_experiment(cfg, d, bundle_dir=tmp_path / name, de_cache=cache, val_signal=True)
            for name, d in (("cells", small_data), ("sums", sums))]
    assert runs[0].history[-1]["val_nll"] == runs[1].history[-1]["val_nll"]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    assert runs[0].metrics["per_perturbation"] == runs[1].metrics["per_perturbation"]
    assert runs[0].metrics["overall_score"] == runs[1].metrics["overall_score"]


def test_a_concise_sweep_unit_receives_sums_not_cells() -> None:
    cfg = small_cfg()
    inputs = read_inputs(cfg)
    folds = assign_folds(inputs, cfg.data.pert_name_col, cfg.data.control_name, 3, 0)
    data, cache = build_fold(cfg, inputs, folds, 0)
    assert data.train is None and data.test.X is None and data.sums.controls is None
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(data, protocol=5, buffer_callback=buffers.append)
    shipped = len(stream) + sum(b.raw().nbytes for b in buffers)
    counts = inputs.train.X.data.nbytes + inputs.train.X.indices.nbytes
    assert shipped < counts / 5, (shipped, counts)
    n_cells = inputs.train.n_obs
    arrays = [data.sums.train.y, data.sums.train.n, data.sums.test.y, data.sums.control_totals]
    assert all(a.shape[0] < n_cells // 2 for a in arrays)
    assert cache is not None
    whole, _ = build_fold(small_cfg("train.fit_mode=whole"), inputs, folds, 0)
    assert whole.sums is None and whole.train.X.nnz > 0
    real, _ = build_fold(small_cfg("sampling.control_cells=real"), inputs, folds, 0)
    assert real.sums.controls.n_obs == real.sums.control_totals.size > 0
