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
from nbglm.data.rows import CHUNK_ROWS
from nbglm.data.summary import group_sums, summarized
from nbglm.metrics import build_cache
from nbglm.pipeline import run_experiment
from nbglm.sweep.folds import build_fold

from small import small_cfg

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_group_sums_equal_dense_sums_per_group(small_data: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nbglm.data.rows.CHUNK_ROWS", 97)  # many chunks, one cut inside a group
    train = small_data.train.copy()
    x = train.X.toarray().astype(np.float64)
    x[3] = 0  # a cell with no counts: counted in n_all only
    train.X = type(train.X)(x.astype(np.float32))
    sums = group_sums(train.X, train.obs, small_data.pert_col, small_data.control, "phase")
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


def _same(a: object, b: object) -> None:
    """Equal dataclasses of arrays (GroupSums, FileSummary), field by field."""
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=name)
        elif x is None or isinstance(x, (int, float, str, tuple, list)):
            assert x == y, name


@pytest.mark.parametrize("profile", ["vcc2025", "vcc2026"])
def test_folds_and_refit_read_from_files_on_disk_equal_those_read_into_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profile: str) -> None:
    """The sweep driver leaves the counts in their files and never copies a fold's training part:
    its folds (sums, effect PCs, ground-truth caches with the cell-mean baseline) and the refit's
    data are the same as when everything is read into memory."""
    from nbglm.data import make_synthetic, write_synthetic
    from nbglm.data.load import assemble
    from nbglm.pipeline import load_inputs

    monkeypatch.setattr("nbglm.data.rows.CHUNK_ROWS", 61)  # many chunks, cut inside groups and folds
    base = small_cfg("data.effect_pcs=4", f"evaluate.profile={profile}")
    write_synthetic(make_synthetic(base.data.synthetic, base.data.pert_name_col, base.data.control_name), tmp_path)
    files = [f"paths.{k}={tmp_path / f}" for k, f in (("train_h5ad", "train.h5ad"), ("test_h5ad", "test.h5ad"),
                                                      ("gene_embedding", "gene_embedding.csv"))]
    cfg = small_cfg("data.effect_pcs=4", f"evaluate.profile={profile}", *files)
    memory, disk = read_inputs(cfg), read_inputs(cfg, on_disk=True)
    assert disk.train.X is None and disk.test.X is None
    folds = assign_folds(memory, cfg.data.pert_name_col, cfg.data.control_name, 3, 0)
    for fold in range(3):
        (a, cache_a), (b, cache_b) = build_fold(cfg, memory, folds, fold), build_fold(cfg, disk, folds, fold)
        np.testing.assert_array_equal(a.gene_emb, b.gene_emb)
        _same(a.sums.train, b.sums.train)
        _same(a.sums.test, b.sums.test)
        np.testing.assert_array_equal(a.sums.control_totals, b.sums.control_totals)
        pd.testing.assert_frame_equal(a.heldout, b.heldout)
        if profile == "vcc2025":
            _same(cache_a.real, cache_b.real)
            assert cache_a.baseline == cache_b.baseline and cache_a.baseline is not None
    whole = small_cfg("train.fit_mode=whole", *files)
    a, _ = build_fold(whole, memory, folds, 0)
    b, _ = build_fold(whole, disk, folds, 0)
    assert b.train_x is None and b.test_x is None
    assert (a.train.X != b.train.X).nnz == 0 and (a.test.X != b.test.X).nnz == 0
    (a, cache_a), (b, cache_b) = (load_inputs(cfg, assemble(cfg, i)) for i in (memory, disk))
    assert a.train_x is None and b.train.X is None and b.test.X is None and (a.test.X != b.test_x.take()).nnz == 0
    np.testing.assert_array_equal(a.gene_emb, b.gene_emb)
    if profile == "vcc2025":
        assert cache_a.baseline == cache_b.baseline
